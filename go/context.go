package keypool

import (
	"context"
	"sync"
)

// SubmitContext is Submit bound to ctx: once ctx is done, the request is cancelled
// (Ticket.Cancel) — never sent if it is still waiting, its connection closed if it is
// on the wire — and answered Cancelled. If ctx is already done, nothing is sent and
// ctx.Err() is returned. The wait for queue space, when the queue is full, is not
// bounded by ctx (keep queue_capacity large enough, or submit from a goroutine).
//
// Wait for the result with WaitContext (or Wait).
func (p *Pool) SubmitContext(ctx context.Context, body string) (*Ticket, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	t, err := p.Submit(body)
	if err != nil {
		return nil, err
	}
	t.cancelWith(ctx)
	return t, nil
}

// cancelWith cancels the request when ctx is done, until the ticket is spent.
func (t *Ticket) cancelWith(ctx context.Context) {
	if ctx.Done() == nil {
		return // never done (context.Background)
	}
	go func() {
		select {
		case <-ctx.Done():
			t.Cancel()
		case <-t.spent:
		}
	}()
}

// WaitContext waits for the result until ctx is done. If ctx ends first, the request
// is cancelled (Ticket.Cancel) and WaitContext returns nil and ctx.Err(); the ticket is
// spent either way. If the request ended before the cancel took effect, its Result is
// returned with a nil error: each request has exactly one outcome.
func (t *Ticket) WaitContext(ctx context.Context) (*Result, error) {
	t.cancelWith(ctx)
	r, err := t.Wait(-1)
	if err != nil {
		return nil, err
	}
	if r.Status == Cancelled && ctx.Err() != nil {
		return nil, ctx.Err()
	}
	return r, nil
}

// BatchContext is Batch bound to ctx: it sends every body and returns one Result per
// body, in input order. Once ctx is done, the requests not answered yet are
// cancelled (never sent if still waiting, their connections closed if on the wire),
// no more are sent, and their Results have Status Cancelled; BatchContext then
// returns the results with ctx.Err(). A bad body gives a failed Result at its index;
// the error is for the call itself (ctx, or the pool closed).
func (p *Pool) BatchContext(ctx context.Context, bodies []string) ([]Result, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	results := make([]Result, len(bodies))
	tickets := make([]*Ticket, len(bodies))
	var mu sync.Mutex // guards tickets and stopped
	stopped := false
	finished := make(chan struct{})
	defer close(finished)
	if ctx.Done() != nil {
		go func() {
			select {
			case <-ctx.Done():
				mu.Lock()
				stopped = true
				for _, t := range tickets {
					if t != nil {
						t.Cancel()
					}
				}
				mu.Unlock()
			case <-finished:
			}
		}()
	}
	cancelled := Result{Status: Cancelled, ErrorCode: "cancelled", ErrorMessage: "the batch's context ended before the request was sent"}
	var callErr error
	for i, b := range bodies {
		mu.Lock()
		stop := stopped || callErr != nil
		mu.Unlock()
		if stop {
			results[i] = cancelled
			continue
		}
		t, err := p.Submit(b)
		if err != nil {
			e, _ := err.(*Error)
			if e == nil || e.code == Closed {
				callErr = err
				results[i] = cancelled
				continue
			}
			results[i] = failed(e)
			continue
		}
		mu.Lock()
		tickets[i] = t
		if stopped {
			t.Cancel()
		}
		mu.Unlock()
	}
	for i, t := range tickets {
		if t == nil {
			continue
		}
		r, err := t.Wait(-1)
		if err != nil {
			results[i] = failed(err.(*Error))
			continue
		}
		results[i] = *r
	}
	if callErr != nil {
		return nil, callErr
	}
	if err := ctx.Err(); err != nil {
		return results, err
	}
	return results, nil
}

// SubmitStreamContext is SubmitStream bound to ctx: once ctx is done, the stream is
// cancelled (Stream.Cancel) — its connection closed at once — and ends with Status
// Cancelled after the chunks already received. If ctx is already done, nothing is
// sent and ctx.Err() is returned.
func (p *Pool) SubmitStreamContext(ctx context.Context, body string) (*Stream, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s, err := p.SubmitStream(body)
	if err != nil {
		return nil, err
	}
	if ctx.Done() != nil {
		go func() {
			select {
			case <-ctx.Done():
				s.Cancel()
			case <-s.done:
			}
		}()
	}
	return s, nil
}

// failed is the Result of a request refused at submission.
func failed(e *Error) Result {
	code := map[Code]string{InvalidArgument: "invalid_argument", InvalidRequest: "invalid_request",
		Busy: "busy", Closed: "closed", WouldDeadlock: "would_deadlock", Panic: "panic"}[e.code]
	return Result{Status: e.code, ErrorCode: code, ErrorMessage: e.msg}
}
