// A real grpc-go server (Debian's golang-google-grpc-dev) run the way Go services run in
// Kubernetes: keepalive.ServerParameters{MaxConnectionAge, MaxConnectionAgeGrace} rolls each
// connection (a GOAWAY with last stream id 2^31-1, a PING, then the GOAWAY with the real last
// id) so that clients rebalance, and SIGTERM calls GracefulStop (a rolling update). After
// the last GOAWAY, grpc-go waits for the client to close the connection (with the default
// MaxConnectionAgeGrace, forever; GracefulStop returns only then). Raw bytes
// both ways (a codec of its own: no generated code), every method under /pkg.Go/.
//
// Server usage: grpcgoserver [-port N] [-max-age DUR] [-max-age-grace DUR] [-max-streams N]
//
//	Prints {"port":N} once listening on 127.0.0.1, {"stopped":true} once GracefulStop returns.
//	Echo    unary: {"message","xid","peer"} (peer: the caller's address, one per connection)
//	Count   server stream: the request is a number n; replies "0" .. "n-1"
//	Sleep   unary: sleeps the request's number of milliseconds, or until SIGUSR1 wakes every
//	        sleeper (so a test ends its calls when it wants, not on a timer), or until the
//	        call is cancelled; replies "slept:MS"
//	Fail    unary: FAILED_PRECONDITION "out of stock"
//	Stats   unary: {"connections": accepted so far, "conns": {client address: {"goaways":
//	        GOAWAY frames sent on it, "refused": streams it reset with REFUSED_STREAM,
//	        "inflight": calls running on it, Stats aside}},
//	        "calls": {method: n}, "xids": {xid: Echo calls that carried it}}
//
// Client usage: grpcgoserver -call TARGET [-authority NAME] [-calls N] [-workers W] [-first F]
//
//	One grpc-go connection to TARGET, N Echo calls from W goroutines, call i carrying the
//	XID 10.0.0.1:8091:(F+i) as metadata `xid`. Prints one JSON line, in call order:
//	[{"code","details","reply","xid"}, ...].
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string   { return "proto" }
func (rawCodec) String() string { return "proto" }

// connInfo is what the server knows of one accepted connection.
type connInfo struct {
	goaways  int64 // GOAWAY frames written (grpc-go's roll or drain: 2, the last one final)
	refused  int64 // RST_STREAM REFUSED_STREAM frames written (MaxConcurrentStreams)
	inflight int64 // calls running on it
}

// watchingListener keeps a connInfo per accepted connection, by the client's address: the
// proof that MaxConnectionAge made the client open new connections, and when grpc-go has
// ended one or refused a stream (not visible through grpc-go's API: the frames it writes
// are read on their way out).
type watchingListener struct {
	net.Listener
	s *server
}

func (l watchingListener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	info := &connInfo{}
	l.s.mu.Lock()
	l.s.conns[conn.RemoteAddr().String()] = info
	l.s.mu.Unlock()
	return &watchedConn{Conn: conn, info: info}, nil
}

// watchedConn counts GOAWAY and RST_STREAM(REFUSED_STREAM) frames among the HTTP/2 frames
// the server writes (a server writes frames only: the connection preface is the client's).
// grpc-go writes from one goroutine, so the parser's state needs no lock.
type watchedConn struct {
	net.Conn
	info   *connInfo
	header [9]byte
	filled int    // bytes of the current frame's header seen
	left   int    // bytes of its payload still to come
	code   []byte // a RST_STREAM's payload: its error code
}

const (
	frameRSTStream = 0x3
	frameGoAway    = 0x7
	refusedStream  = 0x7
)

func (c *watchedConn) Write(p []byte) (int, error) {
	for rest := p; len(rest) > 0; {
		if c.filled < len(c.header) {
			n := copy(c.header[c.filled:], rest)
			c.filled += n
			rest = rest[n:]
			if c.filled == len(c.header) {
				c.left = int(c.header[0])<<16 | int(c.header[1])<<8 | int(c.header[2])
				c.code = c.code[:0]
				if c.header[3] == frameGoAway {
					atomic.AddInt64(&c.info.goaways, 1)
				}
			}
		} else {
			n := c.left
			if n > len(rest) {
				n = len(rest)
			}
			if c.header[3] == frameRSTStream {
				c.code = append(c.code, rest[:n]...)
			}
			c.left -= n
			rest = rest[n:]
		}
		if c.filled == len(c.header) && c.left == 0 {
			c.filled = 0
			if c.header[3] == frameRSTStream && len(c.code) == 4 &&
				binary.BigEndian.Uint32(c.code) == refusedStream {
				atomic.AddInt64(&c.info.refused, 1)
			}
		}
	}
	return c.Conn.Write(p)
}

type server struct {
	wake  chan struct{} // closed on SIGUSR1
	mu    sync.Mutex
	conns map[string]*connInfo
	calls map[string]int
	xids  map[string]int
}

func firstValue(md metadata.MD, key string) string {
	if v := md.Get(key); len(v) > 0 {
		return v[0]
	}
	return ""
}

func (s *server) handle(_ interface{}, stream grpc.ServerStream) error {
	method, _ := grpc.MethodFromServerStream(stream)
	ctx := stream.Context()
	md, _ := metadata.FromIncomingContext(ctx)
	xid := firstValue(md, "xid")
	from := ""
	if p, ok := peer.FromContext(ctx); ok {
		from = p.Addr.String()
	}
	s.mu.Lock()
	info := s.conns[from]
	if info != nil && method != "/pkg.Go/Stats" {
		info.inflight++
		defer func() {
			s.mu.Lock()
			info.inflight--
			s.mu.Unlock()
		}()
	}
	s.calls[method]++
	if method == "/pkg.Go/Echo" {
		s.xids[xid]++
	}
	s.mu.Unlock()

	var in []byte
	if err := stream.RecvMsg(&in); err != nil {
		return err
	}
	var out []byte
	switch method {
	case "/pkg.Go/Echo":
		out, _ = json.Marshal(map[string]string{"message": string(in), "xid": xid, "peer": from})
	case "/pkg.Go/Count":
		n, _ := strconv.Atoi(string(in))
		for i := 0; i < n; i++ {
			reply := []byte(strconv.Itoa(i))
			if err := stream.SendMsg(&reply); err != nil {
				return err
			}
		}
		return nil
	case "/pkg.Go/Sleep":
		ms, _ := strconv.Atoi(string(in))
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
		case <-s.wake:
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
		out = []byte("slept:" + string(in))
	case "/pkg.Go/Fail":
		return status.Error(codes.FailedPrecondition, "out of stock")
	case "/pkg.Go/Stats":
		s.mu.Lock()
		conns := map[string]interface{}{}
		for addr, info := range s.conns {
			conns[addr] = map[string]int64{
				"goaways":  atomic.LoadInt64(&info.goaways),
				"refused":  atomic.LoadInt64(&info.refused),
				"inflight": info.inflight,
			}
		}
		out, _ = json.Marshal(map[string]interface{}{
			"connections": len(s.conns), "conns": conns, "calls": s.calls, "xids": s.xids,
		})
		s.mu.Unlock()
	default:
		return status.Errorf(codes.Unimplemented, "unknown method %s", method)
	}
	return stream.SendMsg(&out)
}

func serve(port int, maxAge, grace time.Duration, maxStreams int) {
	lis, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	s := &server{
		wake:  make(chan struct{}),
		conns: map[string]*connInfo{},
		calls: map[string]int{},
		xids:  map[string]int{},
	}
	woken := make(chan os.Signal, 1)
	signal.Notify(woken, syscall.SIGUSR1)
	go func() {
		<-woken
		close(s.wake)
	}()
	options := []grpc.ServerOption{
		grpc.CustomCodec(rawCodec{}),
		grpc.UnknownServiceHandler(s.handle),
	}
	if maxStreams > 0 {
		options = append(options, grpc.MaxConcurrentStreams(uint32(maxStreams)))
	}
	if maxAge > 0 {
		options = append(options, grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionAge: maxAge, MaxConnectionAgeGrace: grace,
		}))
	}
	srv := grpc.NewServer(options...)
	stopped := make(chan struct{})
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM)
	go func() {
		<-signals
		srv.GracefulStop()
		close(stopped)
	}()
	fmt.Printf("{\"port\":%d}\n", lis.Addr().(*net.TCPAddr).Port)
	if err := srv.Serve(watchingListener{lis, s}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	// Serve returns as GracefulStop begins; the process lives until the calls are done
	<-stopped
	fmt.Println(`{"stopped":true}`)
}

type outcome struct {
	Code    int    `json:"code"`
	Details string `json:"details"`
	Reply   string `json:"reply"`
	Xid     string `json:"xid"`
}

func call(target, authority string, calls, workers, first int) {
	options := []grpc.DialOption{grpc.WithInsecure(), grpc.WithBlock()}
	if authority != "" {
		options = append(options, grpc.WithAuthority(authority))
	}
	dialCtx, cancelDial := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancelDial()
	conn, err := grpc.DialContext(dialCtx, target, options...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial failed:", err)
		os.Exit(2)
	}
	defer conn.Close()
	results := make([]outcome, calls)
	next := int64(-1)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(atomic.AddInt64(&next, 1))
				if i >= calls {
					return
				}
				xid := fmt.Sprintf("10.0.0.1:8091:%d", first+i)
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				ctx = metadata.AppendToOutgoingContext(ctx, "xid", xid)
				in := []byte(strconv.Itoa(i))
				var out []byte
				err := conn.Invoke(ctx, "/pkg.Go/Echo", &in, &out, grpc.ForceCodec(rawCodec{}))
				cancel()
				st := status.Convert(err)
				results[i] = outcome{int(st.Code()), st.Message(), string(out), xid}
			}
		}()
	}
	wg.Wait()
	line, _ := json.Marshal(results)
	fmt.Println(string(line))
}

func main() {
	port := flag.Int("port", 0, "port to listen on (0: a free one)")
	maxAge := flag.Duration("max-age", 0, "keepalive MaxConnectionAge (0: never)")
	grace := flag.Duration("max-age-grace", 0, "keepalive MaxConnectionAgeGrace (0: forever)")
	maxStreams := flag.Int("max-streams", 0, "MaxConcurrentStreams per connection (0: no limit)")
	target := flag.String("call", "", "act as a client of TARGET instead")
	authority := flag.String("authority", "", "the client's :authority")
	calls := flag.Int("calls", 100, "the client's number of Echo calls")
	workers := flag.Int("workers", 4, "the client's goroutines making calls")
	first := flag.Int("first", 1000, "the client's first XID number")
	flag.Parse()
	if *target != "" {
		call(*target, *authority, *calls, *workers, *first)
		return
	}
	serve(*port, *maxAge, *grace, *maxStreams)
}
