// Go's net/http speaking HTTP/2 over TLS (ALPN h2), as a Go service's caller does by default
// once it trusts the server's CA: one transport, several requests in flight on one
// connection. Usage: goh2client CAFILE URL TIMEOUT N METHOD [BODY]. Sends N requests at once,
// each with the header "XID: <the XID env var>" when that is set, and prints one line per
// request: "STATUS <proto> <code> <xid> <status>" or "ERR <error>". Exits 0 either way.
// With the COOKIE env var set, each request carries that Cookie header.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

func main() {
	caFile, url := os.Args[1], os.Args[2]
	timeout, err := time.ParseDuration(os.Args[3])
	if err != nil {
		fmt.Println("USAGE", err)
		os.Exit(2)
	}
	n, err := strconv.Atoi(os.Args[4])
	if err != nil {
		fmt.Println("USAGE", err)
		os.Exit(2)
	}
	method := os.Args[5]
	body := ""
	if len(os.Args) > 6 {
		body = os.Args[6]
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		fmt.Println("USAGE", err)
		os.Exit(2)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	// A custom TLS config turns off the transport's automatic HTTP/2 unless asked for.
	transport := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: roots, ServerName: "localhost"},
		ForceAttemptHTTP2: true,
	}
	client := &http.Client{Transport: transport, Timeout: timeout}
	lines := make([]string, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			req, err := http.NewRequest(method, url, strings.NewReader(body))
			if err != nil {
				lines[i] = "ERR " + err.Error()
				return
			}
			if xid := os.Getenv("XID"); xid != "" {
				req.Header.Set("XID", xid)
			}
			if cookie := os.Getenv("COOKIE"); cookie != "" {
				req.Header.Set("Cookie", cookie) // Go's HTTP/2 transport sends it in crumbs
			}
			resp, err := client.Do(req)
			if err != nil {
				lines[i] = "ERR " + err.Error()
				return
			}
			defer resp.Body.Close()
			io.ReadAll(resp.Body)
			lines[i] = fmt.Sprintf("STATUS %s %d %s %s", resp.Proto, resp.StatusCode,
				resp.Header.Get("XID"), resp.Header.Get("X-Gts-Transaction-Status"))
		}(i)
	}
	wg.Wait()
	for _, line := range lines {
		fmt.Println(line)
	}
}
