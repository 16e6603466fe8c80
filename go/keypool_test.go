package keypool

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

var mockURL, mockBin string

// TestMain starts the mock server ($KEYPOOL_MOCK_BIN, default
// ../target/debug/keypool-mock), which prints its base URL and runs until its stdin
// is closed.
func TestMain(m *testing.M) {
	bin := os.Getenv("KEYPOOL_MOCK_BIN")
	if bin == "" {
		bin = filepath.Join("..", "target", "debug", "keypool-mock")
	}
	mockBin = bin
	cmd := exec.Command(bin)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		fmt.Fprintln(os.Stderr, "mock stdin:", err)
		os.Exit(1)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		fmt.Fprintln(os.Stderr, "mock stdout:", err)
		os.Exit(1)
	}
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "cannot start the mock server %s: %v (build it with `cargo build -p keypool-mock` or set KEYPOOL_MOCK_BIN)\n", bin, err)
		os.Exit(1)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		fmt.Fprintln(os.Stderr, "mock did not print its URL:", err)
		os.Exit(1)
	}
	mockURL = strings.TrimSpace(line)
	go func() { _, _ = io.Copy(io.Discard, stdout) }()

	code := m.Run()

	stdin.Close()
	_ = cmd.Wait()
	os.Exit(code)
}

var labels = []string{"acct-a", "acct-b", "acct-c", "acct-d"}

func config(strategy string) string {
	keys := make([]string, len(labels))
	for i, l := range labels {
		keys[i] = fmt.Sprintf(`{"key": "sk-test-%d", "label": %q, "max_concurrent": 4}`, i, l)
	}
	return fmt.Sprintf(`{"base_url": %q, "strategy": %q, "keys": [%s]}`, mockURL, strategy, strings.Join(keys, ","))
}

func body(i int) string {
	return fmt.Sprintf(`{"model": "m", "messages": [{"role": "user", "content": "go %d"}]}`, i)
}

func newPool(t *testing.T, strategy string) *Pool {
	t.Helper()
	p, err := New(config(strategy))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func TestVersion(t *testing.T) {
	if v := Version(); v == "" || strings.Count(v, ".") != 2 {
		t.Fatalf("Version() = %q", v)
	}
}

func TestBatchSpreadsOverKeys(t *testing.T) {
	p := newPool(t, "round_robin")
	// Round-robin over keys that can all admit when their turn comes (a busy key is
	// skipped, not waited for): 25 batches of 4, one request per key each.
	var results []Result
	for wave := 0; wave < 25; wave++ {
		bodies := make([]string, 4)
		for i := range bodies {
			bodies[i] = body(wave*4 + i)
		}
		rs, err := p.Batch(bodies)
		if err != nil {
			t.Fatalf("Batch: %v", err)
		}
		if len(rs) != 4 {
			t.Fatalf("got %d results", len(rs))
		}
		results = append(results, rs...)
	}
	perKey := map[string]int{}
	for i, r := range results {
		if err := r.Err(); err != nil {
			t.Fatalf("result %d: %v", i, err)
		}
		if r.HTTPStatus != 200 || len(r.Body) == 0 || r.Attempts < 1 {
			t.Fatalf("result %d: %+v", i, r)
		}
		perKey[r.KeyLabel]++
	}
	t.Logf("per key: %v", perKey)
	for _, l := range labels {
		if perKey[l] != 25 {
			t.Errorf("key %s served %d of 100, want 25 (round robin)", l, perKey[l])
		}
	}
	stats, err := p.Stats()
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	if !strings.Contains(stats, `"completed":100`) || strings.Contains(stats, "sk-test-") {
		t.Fatalf("stats: %s", stats)
	}
}

func TestBatchBadBodies(t *testing.T) {
	p := newPool(t, "first_available")
	results, err := p.Batch([]string{body(0), "{not json", "nul\x00byte"})
	if err != nil {
		t.Fatalf("Batch: %v", err)
	}
	want := []Code{OK, InvalidRequest, InvalidArgument}
	for i, r := range results {
		if r.Status != want[i] {
			t.Errorf("result %d: status %v (%d), want %v", i, r.Status, r.Status, want[i])
		}
	}
	if results, err := p.Batch(nil); err != nil || len(results) != 0 {
		t.Fatalf("empty batch: %v, %v", results, err)
	}
}

func TestBadConfig(t *testing.T) {
	for _, cfg := range []string{`{"keys": []}`, `{"keys": 5}`, `not json`,
		`{"keys": [{"key": "sk-test-secret", "max_concurrent": 0}]}`} {
		p, err := New(cfg)
		if p != nil {
			t.Fatalf("New(%s) returned a pool", cfg)
		}
		var ke *Error
		if !errors.As(err, &ke) || ke.Code() != Config {
			t.Fatalf("New(%s): %v, want *Error with code Config", cfg, err)
		}
		if ke.Error() == "" || strings.Contains(ke.Error(), "sk-test-secret") {
			t.Fatalf("bad message: %q", ke.Error())
		}
	}
}

func TestSubmitWaitAndClose(t *testing.T) {
	p := newPool(t, "first_available")
	tk, err := p.Submit(body(1))
	if err != nil {
		t.Fatalf("Submit: %v", err)
	}
	r, err := tk.Wait(30 * time.Second)
	if err != nil || r.Err() != nil || r.HTTPStatus != 200 {
		t.Fatalf("Wait: %+v, %v", r, err)
	}
	var ke *Error
	if _, err := tk.Wait(0); !errors.As(err, &ke) || ke.Code() != InvalidArgument {
		t.Fatalf("second Wait: %v", err)
	}

	done := make(chan Result, 1)
	if err := p.SubmitFunc(body(2), func(r Result) { done <- r }); err != nil {
		t.Fatalf("SubmitFunc: %v", err)
	}
	select {
	case r := <-done:
		if r.Err() != nil {
			t.Fatalf("callback result: %v", r.Err())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("callback not called")
	}

	if err := p.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := p.Submit(body(3)); !errors.As(err, &ke) || ke.Code() != Closed {
		t.Fatalf("Submit after Close: %v", err)
	}
	if err := p.SubmitFunc(body(3), func(Result) { t.Error("callback of a refused submit ran") }); !errors.As(err, &ke) || ke.Code() != Closed {
		t.Fatalf("SubmitFunc after Close: %v", err)
	}
	if _, err := p.Batch([]string{body(4)}); !errors.As(err, &ke) || ke.Code() != Closed {
		t.Fatalf("Batch after Close: %v", err)
	}
}

func TestTicketOutlivesPool(t *testing.T) {
	p, err := New(config("first_available"))
	if err != nil {
		t.Fatal(err)
	}
	var tickets []*Ticket
	for i := 0; i < 20; i++ {
		tk, err := p.Submit(body(i))
		if err != nil {
			t.Fatal(err)
		}
		tickets = append(tickets, tk)
	}
	p.Close()
	for i, tk := range tickets {
		r, err := tk.Wait(10 * time.Second)
		if err != nil {
			t.Fatalf("ticket %d: %v", i, err)
		}
		if r.Status != OK && r.Status != Cancelled {
			t.Fatalf("ticket %d: %v", i, r.Err())
		}
	}
}

func TestConcurrentSubmit(t *testing.T) {
	p := newPool(t, "least_loaded")
	var wg sync.WaitGroup
	errs := make(chan error, 16*10)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 10; i++ {
				tk, err := p.Submit(body(g*100 + i))
				if err != nil {
					errs <- err
					return
				}
				r, err := tk.Wait(30 * time.Second)
				if err != nil {
					errs <- err
					return
				}
				if err := r.Err(); err != nil {
					errs <- err
				}
			}
		}(g)
	}
	// Close concurrently with nothing: Stats from another goroutine meanwhile.
	for i := 0; i < 5; i++ {
		if _, err := p.Stats(); err != nil {
			t.Error(err)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	stats, _ := p.Stats()
	if !strings.Contains(stats, `"completed":160`) {
		t.Fatalf("stats: %s", stats)
	}
}

func TestConcurrentClose(t *testing.T) {
	p, err := New(config("first_available"))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 5; i++ {
				if tk, err := p.Submit(body(i)); err == nil {
					_, _ = tk.Wait(10 * time.Second)
				}
			}
		}()
	}
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() { defer wg.Done(); p.Close() }()
	}
	wg.Wait()
}

func TestStream(t *testing.T) {
	p := newPool(t, "first_available")
	s, err := p.SubmitStream(`{"model": "m", "messages": [{"role": "user", "content": "stream me"}]}`)
	if err != nil {
		t.Fatalf("SubmitStream: %v", err)
	}
	defer s.Close()
	var text strings.Builder
	n := 0
	for c := range s.Chunks() {
		if len(c.JSON) == 0 || c.JSON[0] != '{' {
			t.Fatalf("chunk JSON: %q", c.JSON)
		}
		text.WriteString(c.Delta)
		n++
	}
	r := s.Result()
	if r.Err() != nil {
		t.Fatalf("result: %v", r.Err())
	}
	if text.String() != "echo: stream me" || n < 3 {
		t.Fatalf("text %q from %d chunks", text.String(), n)
	}
	b := string(r.Body)
	if !strings.Contains(b, `"chat.completion"`) || !strings.Contains(b, `"usage"`) || !strings.Contains(b, "echo: stream me") {
		t.Fatalf("body %s", b)
	}
}

func TestStreamErrorAndClose(t *testing.T) {
	p := newPool(t, "first_available")
	s, err := p.SubmitStream(`{"model": "m", "messages": [{"role": "user", "content": "abcdefgh"}], "mock": {"stream_fault": "truncate", "fault_after": 1}}`)
	if err != nil {
		t.Fatalf("SubmitStream: %v", err)
	}
	r := s.Result()
	s.Close()
	var e *Error
	if !errors.As(r.Err(), &e) || e.Code() != StreamFailed || r.ErrorCode != "stream" {
		t.Fatalf("want a Stream error, got %+v", r)
	}
	// Closed half-read, from several goroutines at once: no leak, no race, no hang.
	s, err = p.SubmitStream(`{"model": "m", "messages": [{"role": "user", "content": "a long prompt here"}], "mock": {"chunk_delay_ms": 20, "stream_chunks": 20}}`)
	if err != nil {
		t.Fatalf("SubmitStream: %v", err)
	}
	<-s.Chunks()
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); s.Close() }()
	}
	wg.Wait()
	if r := s.Result(); r.Status != Cancelled {
		t.Fatalf("closed stream: %+v", r)
	}
	if _, err := p.SubmitStream(`[1]`); err == nil {
		t.Fatal("a body that is not an object must be refused")
	}
}

// A prompt the server flags (OpenRouter's moderation 403, scripted through the mock's
// directive) fails alone with Flagged, blamed on the request; no key is taken out.
func TestFlaggedRequestBlamesTheRequest(t *testing.T) {
	p := newPool(t, "round_robin")
	flagged := `{"model": "m", "messages": [{"role": "user", "content": "bad"}], "mock": {"status": 403, "body": "{\"error\":{\"code\":403,\"message\":\"Your input was flagged\",\"metadata\":{\"reasons\":[\"harassment\"],\"flagged_input\":\"bad\"}}}"}}`
	results, err := p.Batch([]string{body(0), flagged, body(2), body(3), body(4)})
	if err != nil {
		t.Fatalf("Batch: %v", err)
	}
	for i, r := range results {
		if i == 1 {
			var e *Error
			if !errors.As(r.Err(), &e) || e.Code() != Flagged || r.ErrorCode != "flagged" || r.Blame != "request" || r.HTTPStatus != 403 || r.Attempts != 1 {
				t.Fatalf("flagged result: %+v", r)
			}
			continue
		}
		if r.Err() != nil || r.Blame != "" {
			t.Fatalf("result %d: %+v", i, r)
		}
	}
	stats, err := p.Stats()
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	if strings.Contains(stats, `"disabled_reason":"`) || strings.Count(stats, `"disabled_reason":null`) != len(labels) {
		t.Fatalf("a key was taken out: %s", stats)
	}
}

// A spend cap (max_cost) reached by the estimated cost of the first answer (prices
// per million tokens, the mock reporting no usage.cost): the next request is not sent
// and fails with BudgetExhausted, status 17.
func TestSpendCapRefusesWithBudgetExhausted(t *testing.T) {
	if BudgetExhausted != 17 {
		t.Fatalf("BudgetExhausted = %d, want 17", BudgetExhausted)
	}
	cfg := fmt.Sprintf(`{"base_url": %q, "max_cost": 0.000001, "prices": {"m": {"prompt": 1000, "completion": 1000}}, "keys": [{"key": "sk-test-0", "label": "acct-a", "max_concurrent": 1}]}`, mockURL)
	p, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	defer p.Close()
	first, err := p.Batch([]string{body(0)})
	if err != nil || len(first) != 1 || first[0].Err() != nil {
		t.Fatalf("first: %+v %v", first, err)
	}
	second, err := p.Batch([]string{body(1), body(2)})
	if err != nil || len(second) != 2 {
		t.Fatalf("second: %+v %v", second, err)
	}
	for i, r := range second {
		var e *Error
		if !errors.As(r.Err(), &e) || e.Code() != BudgetExhausted || r.ErrorCode != "budget_exhausted" || r.Attempts != 0 {
			t.Fatalf("result %d: %+v", i, r)
		}
	}
	if s := BudgetExhausted.String(); !strings.Contains(s, "budget") {
		t.Fatalf("String() = %q", s)
	}
}

// startMock starts another mock server with extra flags; it stops at the test's end.
func startMock(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(mockBin, args...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); _ = cmd.Wait() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	go func() { _, _ = io.Copy(io.Discard, stdout) }()
	return strings.TrimSpace(line)
}

// A key at a mock taking one request at a time: a 429 cools it, a trial after the
// cooldown reopens it; the events arrive in that order, and the metrics count the 429.
func TestEventsAndPrometheus(t *testing.T) {
	url := startMock(t, "--key-capacity", "1", "--latency-ms", "100")
	p, err := New(fmt.Sprintf(`{"base_url": %q, "retry": {"default_cooldown_ms": 200},
		"keys": [{"key": "sk-test-SECRET-go", "label": "acct-go", "max_concurrent": 2}]}`, url))
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var events []KeyEvent
	if err := p.OnEvent(func(e KeyEvent) {
		mu.Lock()
		events = append(events, e)
		mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	results, err := p.Batch([]string{body(1), body(2), body(3), body(4)})
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range results {
		if r.Err() != nil {
			t.Fatalf("result %d: %v", i, r.Err())
		}
	}
	text := p.Prometheus()
	if !strings.Contains(text, `keypool_requests_total{key="acct-go",outcome="success"} 4`+"\n") {
		t.Errorf("metrics: %s", text)
	}
	if strings.Contains(text, `keypool_requests_total{key="acct-go",outcome="rate_limited"} 0`+"\n") {
		t.Errorf("no 429 counted: %s", text)
	}
	if strings.Contains(text, "SECRET") {
		t.Errorf("a key in the metrics: %s", text)
	}
	p.Close() // every event delivered
	if p.Prometheus() != "" {
		t.Error("Prometheus after Close")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(events) < 2 || events[0].Kind != "cooled" || events[1].Kind != "reopened" ||
		events[len(events)-1].Kind != "reopened" {
		t.Fatalf("events: %+v", events)
	}
	e := events[0]
	if e.Label != "acct-go" || e.KeyIndex != 0 || e.Duration <= 0 || e.At.IsZero() {
		t.Errorf("cooled: %+v", e)
	}
	for _, e := range events {
		if strings.Contains(e.Reason, "SECRET") {
			t.Errorf("a key in an event: %+v", e)
		}
	}
}
