package keypool

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// onePool is a pool of one key with one worker: a request can only be served once the
// one before it has let go of the worker.
func onePool(t *testing.T, label string) *Pool {
	t.Helper()
	p, err := New(fmt.Sprintf(`{"base_url": %q, "keys": [{"key": "sk-go-%s", "label": %q, "max_concurrent": 1}]}`, mockURL, label, label))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func slowBody(ms int) string {
	return fmt.Sprintf(`{"model": "m", "messages": [{"role": "user", "content": "hi"}], "mock": {"delay_ms": %d}}`, ms)
}

// waitInFlight waits until the pool's one key has a request on the wire.
func waitInFlight(t *testing.T, p *Pool) {
	t.Helper()
	for i := 0; i < 1000; i++ {
		s, err := p.StatsSnapshot()
		if err != nil {
			t.Fatalf("StatsSnapshot: %v", err)
		}
		if s.Keys[0].InFlight == 1 {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("the request never went on the wire")
}

func TestWaitContextCancelsAnInFlightRequest(t *testing.T) {
	p := onePool(t, "ctx-wait")
	tk, err := p.Submit(slowBody(30000))
	if err != nil {
		t.Fatal(err)
	}
	waitInFlight(t, p)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	r, err := tk.WaitContext(ctx)
	if !errors.Is(err, context.DeadlineExceeded) || r != nil {
		t.Fatalf("WaitContext = %+v, %v; want nil, deadline exceeded", r, err)
	}
	// The one worker is free: the next request is served long before the 30 s.
	r, err = mustSubmit(t, p, body(1)).Wait(10 * time.Second)
	if err != nil || r.Err() != nil {
		t.Fatalf("next request: %v %v", err, r)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("the worker was freed after %v", d)
	}
	s, _ := p.StatsSnapshot()
	k := s.Keys[0]
	if k.CooldownRemainingMs != 0 || k.DisabledReason != nil || k.Failed != 0 {
		t.Fatalf("the key was blamed: %+v", k)
	}
	if tk.Cancel() {
		t.Fatal("Cancel on a spent ticket returned true")
	}
}

func mustSubmit(t *testing.T, p *Pool, b string) *Ticket {
	t.Helper()
	tk, err := p.Submit(b)
	if err != nil {
		t.Fatalf("Submit: %v", err)
	}
	return tk
}

func TestSubmitContextCancelsAQueuedRequest(t *testing.T) {
	p := onePool(t, "ctx-queued")
	first := mustSubmit(t, p, slowBody(500))
	waitInFlight(t, p)
	ctx, cancel := context.WithCancel(context.Background())
	queued, err := p.SubmitContext(ctx, body(2))
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	start := time.Now()
	r, err := queued.Wait(5 * time.Second)
	if err != nil || r.Status != Cancelled {
		t.Fatalf("queued: %+v %v; want Cancelled", r, err)
	}
	if d := time.Since(start); d > 300*time.Millisecond {
		t.Fatalf("answered after %v, want at once", d)
	}
	if r, err := first.Wait(5 * time.Second); err != nil || r.Err() != nil {
		t.Fatalf("first: %v %v", err, r)
	}
	// A done context sends nothing.
	if _, err := p.SubmitContext(ctx, body(3)); !errors.Is(err, context.Canceled) {
		t.Fatalf("SubmitContext on a done context: %v", err)
	}
	s, _ := p.StatsSnapshot()
	if s.Keys[0].Sent != 1 || s.Submitted != 2 || s.Completed != 2 {
		t.Fatalf("stats: %+v", s)
	}
}

func TestCancelRacingCompletionGivesOneResult(t *testing.T) {
	p := newPool(t, "first_available")
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				tk := mustSubmit(t, p, body(i))
				time.Sleep(time.Duration((g*50+i)%7) * 100 * time.Microsecond)
				won := tk.Cancel()
				r, err := tk.Wait(10 * time.Second)
				if err != nil {
					t.Errorf("Wait: %v", err)
					return
				}
				if won != (r.Status == Cancelled) || (!won && r.Status != OK) {
					t.Errorf("cancel returned %v, result %v", won, r.Status)
				}
			}
		}(g)
	}
	wg.Wait()
	s, _ := p.StatsSnapshot()
	if s.Submitted != 200 || s.Completed != 200 {
		t.Fatalf("submitted %d, completed %d", s.Submitted, s.Completed)
	}
}

func TestBatchContext(t *testing.T) {
	p := onePool(t, "ctx-batch")
	bodies := []string{body(0), "{not json", slowBody(30000), body(3), body(4)}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	results, err := p.BatchContext(ctx, bodies)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("BatchContext error %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("BatchContext returned after %v", d)
	}
	want := []Code{OK, InvalidRequest, Cancelled, Cancelled, Cancelled}
	for i, r := range results {
		if r.Status != want[i] {
			t.Errorf("result %d: %v (%s), want %v", i, r.Status, r.ErrorMessage, want[i])
		}
	}
	// Without a deadline, everything is answered.
	results, err = p.BatchContext(context.Background(), []string{body(5), body(6)})
	if err != nil || len(results) != 2 || results[0].Err() != nil || results[1].Err() != nil {
		t.Fatalf("BatchContext: %v %+v", err, results)
	}
}

func TestStreamEndsWithItsContext(t *testing.T) {
	p := onePool(t, "ctx-stream")
	ctx, cancel := context.WithCancel(context.Background())
	s, err := p.SubmitStreamContext(ctx, `{"model": "m", "messages": [], "mock": {"stream_fault": "stall", "fault_after": 1}}`)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := <-s.Chunks(); !ok {
		t.Fatal("no first chunk")
	}
	cancel()
	start := time.Now()
	if r := s.Result(); r.Status != Cancelled {
		t.Fatalf("stream result %+v, want Cancelled", r)
	}
	r, err := mustSubmit(t, p, body(1)).Wait(10 * time.Second)
	if err != nil || r.Err() != nil {
		t.Fatalf("next request: %v %v", err, r)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("the stream's worker was freed after %v", d)
	}
	s.Close()
}

func TestStatsSnapshot(t *testing.T) {
	p := newPool(t, "first_available")
	if _, err := p.Batch([]string{body(0), body(1), body(2)}); err != nil {
		t.Fatal(err)
	}
	s, err := p.StatsSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	if s.Submitted != 3 || s.Completed != 3 || len(s.Keys) != len(labels) {
		t.Fatalf("stats: %+v", s)
	}
	var sent uint64
	for i, k := range s.Keys {
		if k.Label != labels[i] || k.MaxConcurrent != 4 || k.DisabledReason != nil {
			t.Fatalf("key %d: %+v", i, k)
		}
		sent += k.Sent
	}
	if sent != 3 {
		t.Fatalf("sent %d", sent)
	}
	p.Close()
	if _, err := p.StatsSnapshot(); err == nil || err.(*Error).Code() != Closed {
		t.Fatalf("StatsSnapshot after Close: %v", err)
	}
}

func TestSetLoggerReceivesWarnings(t *testing.T) {
	var mu sync.Mutex
	var got []string
	SetLogger(func(level LogLevel, msg string) {
		mu.Lock()
		got = append(got, level.String()+": "+msg)
		mu.Unlock()
	})
	defer SetLogger(nil)
	p := onePool(t, "revoked")
	r, err := mustSubmit(t, p, `{"model": "m", "messages": [], "mock": {"status": 401}}`).Wait(10 * time.Second)
	if err != nil || r.Status != NoUsableKey { // its only key is out: revoked
		t.Fatalf("401 request: %v %+v", err, r)
	}
	// Key events are logged on the pool's events thread; Close returns once every
	// one was delivered, so the warning has been logged by then.
	p.Close()
	mu.Lock()
	defer mu.Unlock()
	for _, m := range got {
		if strings.HasPrefix(m, "warn: ") && strings.Contains(m, "revoked") {
			if strings.Contains(m, "sk-go-") {
				t.Fatalf("a key in a log message: %q", m)
			}
			return
		}
	}
	t.Fatalf("no warning naming the disabled key; got %q", got)
}
