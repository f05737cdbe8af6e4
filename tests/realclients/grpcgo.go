// A real grpc-go client (Debian's golang-google-grpc-dev), as the Go services the sidecar
// is for call each other: raw bytes both ways (a codec of its own: no generated code).
// Usage: grpcgo TARGET KIND METHOD MESSAGE [XID] [DEADLINE_MS] [AUTHORITY]
//   KIND unary | stream (server streaming).
// Prints one JSON line: {code, details, replies, headers, trailers}; exits 0.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

type result struct {
	Code     int               `json:"code"`
	Details  string            `json:"details"`
	Replies  []string          `json:"replies"`
	Headers  map[string]string `json:"headers"`
	Trailers map[string]string `json:"trailers"`
}

func flat(md metadata.MD) map[string]string {
	out := map[string]string{}
	for k, v := range md {
		if len(v) > 0 {
			out[k] = v[0]
		}
	}
	return out
}

func main() {
	args := append(os.Args[1:], "", "", "")
	target, kind, method, message, xid, deadline, authority := args[0], args[1], args[2], args[3], args[4], args[5], args[6]
	options := []grpc.DialOption{grpc.WithInsecure(), grpc.WithBlock()}
	if authority != "" {
		options = append(options, grpc.WithAuthority(authority))
	}
	dialCtx, cancelDial := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancelDial()
	conn, err := grpc.DialContext(dialCtx, target, options...)
	if err != nil {
		fmt.Println(`{"code":-1,"details":"dial failed"}`)
		return
	}
	defer conn.Close()
	ctx := context.Background()
	if deadline != "" {
		ms, _ := strconv.Atoi(deadline)
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(ms)*time.Millisecond)
		defer cancel()
	}
	if xid != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "xid", xid)
	}
	res := result{Replies: []string{}}
	var header, trailer metadata.MD
	in := []byte(message)
	if kind == "unary" {
		var out []byte
		err = conn.Invoke(ctx, method, &in, &out, grpc.ForceCodec(rawCodec{}),
			grpc.Header(&header), grpc.Trailer(&trailer))
		if err == nil {
			res.Replies = append(res.Replies, string(out))
		}
	} else {
		desc := &grpc.StreamDesc{ServerStreams: true}
		var stream grpc.ClientStream
		stream, err = conn.NewStream(ctx, desc, method, grpc.ForceCodec(rawCodec{}))
		if err == nil {
			if err = stream.SendMsg(&in); err == nil {
				err = stream.CloseSend()
			}
			for err == nil {
				var out []byte
				if err = stream.RecvMsg(&out); err == nil {
					res.Replies = append(res.Replies, string(out))
				}
			}
			if err == io.EOF {
				err = nil
			}
			header, _ = stream.Header()
			trailer = stream.Trailer()
		}
	}
	st := status.Convert(err)
	res.Code = int(st.Code())
	res.Details = st.Message()
	res.Headers = flat(header)
	res.Trailers = flat(trailer)
	line, _ := json.Marshal(res)
	fmt.Println(string(line))
}
