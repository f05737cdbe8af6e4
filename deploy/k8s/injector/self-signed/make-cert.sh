#!/usr/bin/env bash
# A CA and the injector's serving certificate, with openssl only (no cert-manager).
#   make-cert.sh OUTDIR [NAMESPACE]      (default namespace: gts-system)
# Writes OUTDIR/ca.crt, ca.key, tls.crt, tls.key and prints the kubectl commands that install
# them. Keep ca.key out of the cluster (it signs the next certificate, nothing else needs it).
set -euo pipefail
out=${1:?usage: make-cert.sh OUTDIR [NAMESPACE]}
ns=${2:-gts-system}
svc="gts-sidecar-injector.${ns}.svc"
mkdir -p "$out"
cd "$out"
umask 077

# the CA: ten years, EC P-256, marked as a CA that signs certificates only
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
  -subj "/CN=gts-sidecar-injector CA" -keyout ca.key -out ca.crt \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  2>/dev/null

# the serving certificate: one year, for the Service's DNS names (what the API server checks)
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=${svc}" \
  -keyout tls.key -out tls.csr 2>/dev/null
cat > tls.ext <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:${svc},DNS:${svc}.cluster.local
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
EXT
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
  -extfile tls.ext -out tls.crt 2>/dev/null
rm -f tls.csr tls.ext ca.srl
chmod 644 ca.crt tls.crt

cat <<EOT
Certificates in ${out}. Install them:
  kubectl create namespace ${ns}
  kubectl -n ${ns} create secret tls gts-sidecar-injector-tls --cert=${out}/tls.crt --key=${out}/tls.key
  kubectl apply -k deploy/k8s/injector/self-signed
  kubectl patch mutatingwebhookconfiguration gts-sidecar-injector --type=json \\
    -p '[{"op":"add","path":"/webhooks/0/clientConfig/caBundle","value":"'"\$(base64 -w0 ${out}/ca.crt)"'"}]'
EOT
