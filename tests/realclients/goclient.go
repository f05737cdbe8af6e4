// A Go net/http client as services use it: the default transport, http.Client{Timeout}.
// Usage: goclient METHOD URL TIMEOUT [BODY]. Prints "STATUS <code> <xid> <status>" or
// "ERR <error>" and exits 0 either way (the test reads the line).
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

func main() {
	method, url := os.Args[1], os.Args[2]
	timeout, err := time.ParseDuration(os.Args[3])
	if err != nil {
		fmt.Println("USAGE", err)
		os.Exit(2)
	}
	var body io.Reader
	if len(os.Args) > 4 {
		body = strings.NewReader(os.Args[4])
	}
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		fmt.Println("USAGE", err)
		os.Exit(2)
	}
	client := &http.Client{Timeout: timeout}
	resp, err := client.Do(req)
	if err != nil {
		fmt.Println("ERR", err)
		return
	}
	defer resp.Body.Close()
	io.ReadAll(resp.Body)
	fmt.Println("STATUS", resp.StatusCode, resp.Header.Get("XID"),
		resp.Header.Get("X-Gts-Transaction-Status"))
}
