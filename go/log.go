package keypool

/*
#include <stdint.h>
#include "keypool.h"

extern void goKeypoolLog(uint32_t level, char *message, void *user_data);

static inline keypool_status kp_set_log(int on) {
	return keypool_set_log_callback(on ? (keypool_log_callback)goKeypoolLog : NULL, NULL);
}
*/
import "C"

import (
	"sync"
	"unsafe"
)

// LogLevel is the level of a keypool log message.
type LogLevel int

// The levels of include/keypool.h (KEYPOOL_LOG_*).
const (
	LogError LogLevel = C.KEYPOOL_LOG_ERROR // a caught panic, a failure not reported otherwise
	LogWarn  LogLevel = C.KEYPOOL_LOG_WARN  // e.g. a key disabled after HTTP 401
	LogInfo  LogLevel = C.KEYPOOL_LOG_INFO
)

// String is "error", "warn" or "info".
func (l LogLevel) String() string {
	switch l {
	case LogError:
		return "error"
	case LogWarn:
		return "warn"
	case LogInfo:
		return "info"
	}
	return "unknown"
}

var (
	loggerMu sync.RWMutex
	logger   func(LogLevel, string)
)

// SetLogger sets the function that receives keypool's log messages — warnings (a key
// disabled after HTTP 401, parked for its credit) and errors, including every panic
// keypool caught — for every pool of the process (keypool_set_log_callback). Without
// one they are dropped: keypool never writes to stdout or stderr. nil removes it.
//
// fn runs on keypool's own threads, several at once: it must be safe for concurrent
// use and quick, and must not call SetLogger. Messages never contain an API key.
func SetLogger(fn func(level LogLevel, message string)) {
	loggerMu.Lock()
	logger = fn
	loggerMu.Unlock()
	on := C.int(0)
	if fn != nil {
		on = 1
	}
	// After this returns, the C library calls no previous callback any more.
	C.kp_set_log(on)
}

//export goKeypoolLog
func goKeypoolLog(level C.uint32_t, message *C.char, _ unsafe.Pointer) {
	loggerMu.RLock()
	fn := logger
	loggerMu.RUnlock()
	if fn != nil {
		fn(LogLevel(level), C.GoString(message))
	}
}
