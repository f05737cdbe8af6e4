// Decodes a JSON answer as a Go service would: json.Unmarshal into map[string]any, where
// every JSON number becomes a float64, then marshals it again. A 64-bit id sent as a number
// comes back rounded (193705495666798593 -> 193705495666798600); one sent as a string, intact.
// Usage: godecode URL. Prints the re-marshalled JSON, or "ERR <error>" (exit 1).
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

func main() {
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get(os.Args[1])
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	var decoded map[string]any
	if err := json.Unmarshal(raw, &decoded); err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	again, err := json.Marshal(decoded)
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	fmt.Println(string(again))
}
