package keypool

import "encoding/json"

// Stats is a snapshot of a pool's counters (StatsSnapshot): the JSON of Stats(),
// decoded. Labels only, never keys.
type Stats struct {
	Submitted uint64 `json:"submitted"` // requests accepted by Submit and friends
	Completed uint64 `json:"completed"` // requests answered (success or error)
	Queued    int    `json:"queued"`    // requests waiting in the queue now
	// Median and 99th-percentile queue time over all requests sent (submit to first
	// send), milliseconds.
	QueueP50Ms float64      `json:"queue_p50_ms"`
	QueueP99Ms float64      `json:"queue_p99_ms"`
	Keys       []KeyStats   `json:"keys"`   // per key, in config order
	Groups     []GroupStats `json:"groups"` // per account group, in config order
}

// FailureCounts counts a key's failed attempts by class.
type FailureCounts struct {
	RateLimited uint64 `json:"rate_limited"` // HTTP 429
	ClientError uint64 `json:"client_error"` // other 4xx, errors inside a 200 body
	ServerError uint64 `json:"server_error"` // 5xx
	Transport   uint64 `json:"transport"`    // connection failures, cut-short bodies
	Timeout     uint64 `json:"timeout"`      // connect or attempt timeouts
	Other       uint64 `json:"other"`        // panics and anything else
}

// KeyStats is one key's activity. Optional figures are nil when they do not apply.
type KeyStats struct {
	Index         int           `json:"index"`
	Label         string        `json:"label"`
	MaxConcurrent int           `json:"max_concurrent"`
	InFlight      int           `json:"in_flight"`
	MaxInFlight   int           `json:"max_in_flight"`
	Sent          uint64        `json:"sent"`      // HTTP attempts started
	Succeeded     uint64        `json:"succeeded"` // attempts that succeeded
	Failed        uint64        `json:"failed"`    // attempts that failed
	Failures      FailureCounts `json:"failures"`
	Retries       uint64        `json:"retries"`
	LatencyP50Ms  float64       `json:"latency_p50_ms"`
	LatencyP99Ms  float64       `json:"latency_p99_ms"`
	QueueP50Ms    float64       `json:"queue_p50_ms"`
	QueueP99Ms    float64       `json:"queue_p99_ms"`
	TTFTP50Ms     float64       `json:"ttft_p50_ms"` // streams: time to first token
	TTFTP99Ms     float64       `json:"ttft_p99_ms"`
	PromptTokens  uint64        `json:"prompt_tokens"`
	// CompletionTokens sums usage.completion_tokens of successful responses.
	CompletionTokens    uint64   `json:"completion_tokens"`
	CooldownRemainingMs uint64   `json:"cooldown_remaining_ms"`
	DisabledReason      *string  `json:"disabled_reason"`
	DisabledAtUnixMs    *uint64  `json:"disabled_at_unix_ms"`
	RPMBudget           *float64 `json:"rpm_budget"`
	TPMBudget           *float64 `json:"tpm_budget"`
	LearnedRPM          *float64 `json:"learned_rpm"`
	LearnedTPM          *float64 `json:"learned_tpm"`
	Group               *string  `json:"group"`
	LearnedLimit        *int     `json:"learned_limit"`
	CreditRemaining     *float64 `json:"credit_remaining"`
	Cost                float64  `json:"cost"`   // dollars: the sum of usage.cost
	Parked              bool     `json:"parked"` // out of rotation for its credit
	Rejoined            uint64   `json:"rejoined"`
}

// GroupStats is one account group's shared limits.
type GroupStats struct {
	Name                string   `json:"name"`
	MaxConcurrent       *int     `json:"max_concurrent"`
	InFlight            int      `json:"in_flight"`
	MaxInFlight         int      `json:"max_in_flight"`
	CooldownRemainingMs uint64   `json:"cooldown_remaining_ms"`
	RPMBudget           *float64 `json:"rpm_budget"`
	TPMBudget           *float64 `json:"tpm_budget"`
}

// StatsSnapshot returns the pool's counters, typed (Stats returns the same as JSON
// text). A closed pool gives an *Error with Code Closed.
func (p *Pool) StatsSnapshot() (*Stats, error) {
	text, err := p.Stats()
	if err != nil {
		return nil, err
	}
	var s Stats
	if err := json.Unmarshal([]byte(text), &s); err != nil {
		return nil, &Error{code: Panic, msg: "cannot decode keypool_pool_stats_json: " + err.Error()}
	}
	return &s, nil
}
