package keypool

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// The examples run against the mock server the tests start (mockURL); with real keys,
// use your provider's base URL, e.g. "https://openrouter.ai/api/v1".

func exampleConfig() string {
	return `{"base_url": "` + mockURL + `",
		"keys": [{"key": "sk-example-a", "label": "acct-a", "max_concurrent": 2},
		         {"key": "sk-example-b", "label": "acct-b", "max_concurrent": 2}]}`
}

func ExamplePool_Batch() {
	pool, err := New(exampleConfig())
	if err != nil {
		panic(err)
	}
	defer pool.Close()
	results, err := pool.Batch([]string{
		`{"model": "m", "messages": [{"role": "user", "content": "Say hi"}]}`,
		`{"model": "m", "messages": [{"role": "user", "content": "Say bye"}]}`,
	})
	if err != nil {
		panic(err)
	}
	for i, r := range results {
		if err := r.Err(); err != nil {
			fmt.Println(i, "failed:", err)
			continue
		}
		fmt.Println(i, "HTTP", r.HTTPStatus)
	}
	// Output:
	// 0 HTTP 200
	// 1 HTTP 200
}

func ExamplePool_SubmitContext() {
	pool, err := New(exampleConfig())
	if err != nil {
		panic(err)
	}
	defer pool.Close()
	// The request is cancelled if it has not ended within 10 s.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ticket, err := pool.SubmitContext(ctx, `{"model": "m", "messages": [{"role": "user", "content": "Say hi"}]}`)
	if err != nil {
		panic(err)
	}
	r, err := ticket.WaitContext(ctx)
	if err != nil {
		panic(err)
	}
	fmt.Println("HTTP", r.HTTPStatus)
	// Output: HTTP 200
}

func ExampleTicket_WaitContext() {
	pool, err := New(exampleConfig())
	if err != nil {
		panic(err)
	}
	defer pool.Close()
	// The mock answers this one after 30 s; the context gives up after 100 ms, which
	// cancels the request: its connection is closed and its worker freed at once.
	ticket, err := pool.Submit(`{"model": "m", "messages": [], "mock": {"delay_ms": 30000}}`)
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = ticket.WaitContext(ctx)
	fmt.Println(err)
	// Output: context deadline exceeded
}

func ExampleTicket_Cancel() {
	pool, err := New(exampleConfig())
	if err != nil {
		panic(err)
	}
	defer pool.Close()
	ticket, err := pool.Submit(`{"model": "m", "messages": [], "mock": {"delay_ms": 30000}}`)
	if err != nil {
		panic(err)
	}
	fmt.Println("cancelled:", ticket.Cancel())
	r, err := ticket.Wait(-1)
	if err != nil {
		panic(err)
	}
	fmt.Println(r.ErrorCode)
	fmt.Println("again:", ticket.Cancel()) // after the end: a no-op
	// Output:
	// cancelled: true
	// cancelled
	// again: false
}

func ExamplePool_SubmitStreamContext() {
	pool, err := New(exampleConfig())
	if err != nil {
		panic(err)
	}
	defer pool.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := pool.SubmitStreamContext(ctx, `{"model": "m", "messages": [{"role": "user", "content": "Say hi"}]}`)
	if err != nil {
		panic(err)
	}
	var text strings.Builder
	for c := range stream.Chunks() {
		text.WriteString(c.Delta) // as it arrives
	}
	r := stream.Result()
	fmt.Println("HTTP", r.HTTPStatus, "text received:", text.Len() > 0)
	// Output: HTTP 200 text received: true
}

func ExamplePool_StatsSnapshot() {
	pool, err := New(exampleConfig())
	if err != nil {
		panic(err)
	}
	defer pool.Close()
	if _, err := pool.Batch([]string{`{"model": "m", "messages": []}`, `{"model": "m", "messages": []}`}); err != nil {
		panic(err)
	}
	s, err := pool.StatsSnapshot()
	if err != nil {
		panic(err)
	}
	fmt.Println("completed:", s.Completed)
	for _, k := range s.Keys {
		fmt.Println(k.Label, "max_concurrent", k.MaxConcurrent, "in flight", k.InFlight)
	}
	// Output:
	// completed: 2
	// acct-a max_concurrent 2 in flight 0
	// acct-b max_concurrent 2 in flight 0
}

func ExampleSetLogger() {
	warnings := make(chan string, 16)
	SetLogger(func(level LogLevel, message string) {
		if level == LogWarn {
			select {
			case warnings <- message:
			default:
			}
		}
	})
	defer SetLogger(nil)
	pool, err := New(`{"base_url": "` + mockURL + `",
		"keys": [{"key": "sk-example-revoked", "label": "revoked-key", "max_concurrent": 1}]}`)
	if err != nil {
		panic(err)
	}
	defer pool.Close()
	// The mock answers 401: the key is taken out of rotation, and keypool says so.
	ticket, _ := pool.Submit(`{"model": "m", "messages": [], "mock": {"status": 401}}`)
	r, _ := ticket.Wait(-1)
	fmt.Println(r.ErrorCode)
	fmt.Println(strings.Contains(<-warnings, "revoked-key"))
	// Output:
	// no_usable_key
	// true
}
