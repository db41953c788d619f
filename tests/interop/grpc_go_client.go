// A third gRPC implementation against llmgrpc-server: grpc-go (Go's own
// HTTP/2 framer, as in Go services and grpc-go based proxies), for
// tests/unit/test_transport_interop.py. It knows no .proto: the test hands it
// serialized requests and parses the serialized responses it prints.
//
// stdin:  {"target": "host:port", "calls": [{"method": "/pkg.Service/Method",
//
//	"stream": bool, "request": base64, "metadata": {k: v},
//	"timeout_ms": n, "cancel_after": n (stream: reset after n messages)}]}
//
// stdout: [{"code": n, "details": s, "responses": [base64], "header": {k: [v]}}]
// Every call runs at once, on one connection. Built by `make install`
// (Debian's golang-go and golang-google-grpc-dev, GOPATH mode).
package main

import (
	"context"
	"encoding/json"
	"io"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

type raw struct{}

func (raw) Name() string { return "proto" }

func (raw) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }

func (raw) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}

type call struct {
	Method      string            `json:"method"`
	Stream      bool              `json:"stream"`
	Request     []byte            `json:"request"`
	Metadata    map[string]string `json:"metadata"`
	TimeoutMs   int               `json:"timeout_ms"`
	CancelAfter int               `json:"cancel_after"`
}

type result struct {
	Code      int         `json:"code"`
	Details   string      `json:"details"`
	Responses [][]byte    `json:"responses"`
	Header    metadata.MD `json:"header"`
}

func run(conn *grpc.ClientConn, c call) result {
	timeout := time.Duration(c.TimeoutMs) * time.Millisecond
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	ctx = metadata.NewOutgoingContext(ctx, metadata.New(c.Metadata))
	r := result{Responses: [][]byte{}}
	err := exchange(ctx, cancel, conn, c, &r)
	s := status.Convert(err) // OK when err is nil
	r.Code, r.Details = int(s.Code()), s.Message()
	return r
}

func exchange(ctx context.Context, cancel context.CancelFunc, conn *grpc.ClientConn,
	c call, r *result) error {
	if !c.Stream {
		var resp []byte
		err := conn.Invoke(ctx, c.Method, &c.Request, &resp, grpc.ForceCodec(raw{}),
			grpc.Header(&r.Header))
		if err == nil {
			r.Responses = append(r.Responses, resp)
		}
		return err
	}
	desc := &grpc.StreamDesc{ServerStreams: true}
	stream, err := conn.NewStream(ctx, desc, c.Method, grpc.ForceCodec(raw{}))
	if err != nil {
		return err
	}
	if err := stream.SendMsg(&c.Request); err != nil {
		return err
	}
	if err := stream.CloseSend(); err != nil {
		return err
	}
	if header, err := stream.Header(); err == nil {
		r.Header = header
	}
	for {
		if c.CancelAfter > 0 && len(r.Responses) == c.CancelAfter {
			cancel()
		}
		var resp []byte
		if err := stream.RecvMsg(&resp); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		r.Responses = append(r.Responses, resp)
	}
}

func main() {
	var spec struct {
		Target string `json:"target"`
		Calls  []call `json:"calls"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&spec); err != nil {
		panic(err)
	}
	conn, err := grpc.Dial(spec.Target, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		panic(err)
	}
	defer conn.Close()
	results := make([]result, len(spec.Calls))
	var wg sync.WaitGroup
	for i, c := range spec.Calls {
		wg.Add(1)
		go func(i int, c call) {
			defer wg.Done()
			results[i] = run(conn, c)
		}(i, c)
	}
	wg.Wait()
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		panic(err)
	}
}
