package clienttests

// Backpressure with grpc-go (issue 10, item 3): a standard client is never disconnected when
// the store stalls. The same scenario as tests/python/test_backpressure.py and
// tests/node/backpressure.test.js.
//
// The test holds the SQLite write lock of the server's store (BEGIN IMMEDIATE on
// <data_dir>/events.sqlite3) for 4 s while one Stream call sends 20 000 small events. The
// client must only be slowed down by HTTP/2 flow control: the call ends OK with every answer in
// order, health and ListEventTypes on the same ClientConn keep answering during the stall, the
// one connection is never closed or replaced, and grpc-go never logs a GOAWAY.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/stats"
	"google.golang.org/protobuf/types/dynamicpb"
)

const (
	bpConfig = `
[flood]
threshold = 1000000
window = "3600s"
block = "3600s"
`
	bpWarningType   = "GO_BACKPRESSURE_WARNING"
	bpEvents        = 20_000
	bpLockBefore    = 1_000
	bpHold          = 4 * time.Second
	bpMinStall      = 2 * time.Second
	bpSidePeriod    = 100 * time.Millisecond
	bpSideTimeout   = 2 * time.Second
	bpSideMaxGap    = 500 * time.Millisecond // the 200 ms cadence the issue asks for, plus slack
	bpStreamTimeout = 120 * time.Second
)

var forbidden = []string{"enhance_your_calm", "too_many_data_frames", "goaway", "go_away"}

// connStats counts the HTTP/2 connections the ClientConn opens and closes.
type connStats struct {
	mu           sync.Mutex
	begun, ended int
}

func (c *connStats) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (c *connStats) HandleRPC(context.Context, stats.RPCStats)                       {}
func (c *connStats) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}
func (c *connStats) HandleConn(_ context.Context, s stats.ConnStats) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch s.(type) {
	case *stats.ConnBegin:
		c.begun++
	case *stats.ConnEnd:
		c.ended++
	}
}
func (c *connStats) get() (int, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.begun, c.ended
}

type sideCall struct {
	start, end time.Time
	name       string
	ok         bool
	detail     string
}

func TestGrpcGoStreamSurvivesStoreStall(t *testing.T) {
	c := loadContract(t)
	srv := startServer(t, bpConfig)
	cs := &connStats{}
	conn := srv.dial(t, grpc.WithStatsHandler(cs))
	defer conn.Close()

	ctx := context.Background()
	reg := c.empty(t, "EventType")
	rctx, cancel := context.WithTimeout(ctx, rpcTimeout)
	err := conn.Invoke(rctx, "/fleetevents.v1.CatalogService/RegisterEventType", c.msg(t, "RegisterEventTypeRequest", map[string]any{
		"event_type":   bpWarningType,
		"severity":     c.enumValue(t, "Severity", "SEVERITY_WARNING"),
		"display_name": "Backpressure test warning",
		"application":  "go-test",
	}), reg)
	cancel()
	if err != nil {
		t.Fatalf("RegisterEventType: %v", err)
	}
	if got := getEnum(reg, "raised_by"); got != c.enumValue(t, "RaisedBy", "RAISED_BY_CLIENTS") {
		t.Fatalf("registered type raised_by %v", got)
	}
	if s := conn.GetState(); s != connectivity.Ready {
		t.Fatalf("connection state %v after the first call", s)
	}
	logMark := grpcLog.len()

	// Every connectivity change from now on.
	var statesMu sync.Mutex
	var states []string
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	go func() {
		s := conn.GetState()
		for conn.WaitForStateChange(watchCtx, s) {
			s = conn.GetState()
			statesMu.Lock()
			states = append(states, fmt.Sprintf("%v", s))
			statesMu.Unlock()
		}
	}()

	devices := []string{"go-bp-dev-0", "go-bp-dev-1", "go-bp-dev-2", "go-bp-dev-3"}
	sent := make([]*dynamicpb.Message, bpEvents)
	wantIDs := make([]string, bpEvents)
	for i := range sent {
		wantIDs[i] = fmt.Sprintf("go-bp-%05d", i)
		sent[i] = c.msg(t, "Event", map[string]any{
			"event_id":    wantIDs[i],
			"device_id":   devices[i%len(devices)],
			"event_type":  bpWarningType,
			"application": "go-test",
		})
	}

	// Side calls on the same ClientConn.
	var sideMu sync.Mutex
	var side []sideCall
	sideStop := make(chan struct{})
	sideDone := make(chan struct{})
	go func() {
		defer close(sideDone)
		one := func(name string, f func(context.Context) (bool, string, error)) {
			cctx, cancel := context.WithTimeout(ctx, bpSideTimeout)
			defer cancel()
			t0 := time.Now()
			ok, detail, err := f(cctx)
			if err != nil {
				ok, detail = false, err.Error()
			}
			sideMu.Lock()
			side = append(side, sideCall{t0, time.Now(), name, ok, detail})
			sideMu.Unlock()
		}
		for {
			t0 := time.Now()
			one("Health/Check", func(cctx context.Context) (bool, string, error) {
				st, err := healthCheck(cctx, conn, false)
				return st == "SERVING", st, err
			})
			one("ListEventTypes", func(cctx context.Context) (bool, string, error) {
				resp := c.empty(t, "ListEventTypesResponse")
				err := conn.Invoke(cctx, "/fleetevents.v1.CatalogService/ListEventTypes", c.empty(t, "ListEventTypesRequest"), resp)
				if err != nil {
					return false, "", err
				}
				// A non-empty catalog page (the list may be paged: our type need not be on
				// the first page).
				n := resp.Get(resp.Descriptor().Fields().ByName("event_types")).List().Len()
				return n > 0, fmt.Sprintf("%d types", n), nil
			})
			select {
			case <-sideStop:
				return
			case <-time.After(bpSidePeriod - time.Since(t0)):
			}
		}
	}()

	// The Stream call: a goroutine sends, this one receives.
	sctx, scancel := context.WithTimeout(ctx, bpStreamTimeout)
	defer scancel()
	started := time.Now()
	stream, err := conn.NewStream(sctx, &grpc.StreamDesc{StreamName: "Stream", ServerStreams: true, ClientStreams: true},
		"/fleetevents.v1.EventService/Stream")
	if err != nil {
		t.Fatalf("NewStream: %v", err)
	}
	var lock *writeLock
	sentAt := make([]time.Time, 0, bpEvents)
	var sendErr error
	sendDone := make(chan struct{})
	go func() {
		defer close(sendDone)
		for i, ev := range sent {
			if i == bpLockBefore {
				lock = holdWriteLock(srv.dbPath(), bpHold)
				select {
				case <-lock.acquired:
				case <-time.After(15 * time.Second):
				}
			}
			sentAt = append(sentAt, time.Now())
			if err := stream.SendMsg(ev); err != nil {
				sendErr = err // io.EOF: the server ended the call; RecvMsg has its status
				return
			}
		}
		sendErr = stream.CloseSend()
	}()
	var gotIDs []string
	var answerAt []time.Time
	var recvErr error
	allStored := true
	for {
		a := c.empty(t, "Classification")
		if err := stream.RecvMsg(a); err != nil {
			if !errors.Is(err, io.EOF) {
				recvErr = err
			}
			break
		}
		answerAt = append(answerAt, time.Now())
		gotIDs = append(gotIDs, getString(a, "event_id"))
		if getString(a, "event_type") != bpWarningType || !getBool(a, "stored") || getBool(a, "blocked") {
			allStored = false
		}
	}
	ended := time.Now()
	<-sendDone
	close(sideStop)
	<-sideDone
	var lockErr error
	var tAcq, tRel time.Time
	if lock == nil {
		lockErr = errors.New("the call ended before the lock was taken")
	} else {
		<-lock.done
		lockErr, tAcq, tRel = lock.err, lock.acquiredAt, lock.releasedAt
	}
	stopWatch()
	begun, endedConns := cs.get()
	logLines := grpcLog.since(logMark)
	stderr := srv.stderrText(20000)

	rel := func(x time.Time) string {
		if x.IsZero() {
			return "-"
		}
		return fmt.Sprintf("%.2f", x.Sub(started).Seconds())
	}
	var failed []string
	for _, s := range side {
		if !s.ok && len(failed) < 10 {
			failed = append(failed, fmt.Sprintf("%s %s: %s", rel(s.start), s.name, s.detail))
		}
	}
	statesMu.Lock()
	statesCopy := append([]string(nil), states...)
	statesMu.Unlock()
	tail := stderr
	if len(tail) > 4000 {
		tail = tail[len(tail)-4000:]
	}
	summary := fmt.Sprintf("stream: %d answers in %s s, recv error %v, send error %v\n"+
		"lock: acquired %s s, released %s s after the call started, error %v\n"+
		"side calls: %d, failed %q\nconnections: %d opened, %d closed; states after READY %q\n"+
		"grpc-go log during the test: %q\nserver stderr (tail):\n%s",
		len(gotIDs), rel(ended), recvErr, sendErr, rel(tAcq), rel(tRel), lockErr, len(side), failed,
		begun, endedConns, statesCopy, logLines, tail)

	// The call ended OK with exactly one answer per event, in order.
	if recvErr != nil || (sendErr != nil && !errors.Is(sendErr, io.EOF)) {
		t.Fatalf("the Stream call failed\n%s", summary)
	}
	if len(gotIDs) != bpEvents {
		t.Fatalf("%d answers, want %d\n%s", len(gotIDs), bpEvents, summary)
	}
	for i := range wantIDs {
		if gotIDs[i] != wantIDs[i] {
			t.Fatalf("answer %d is %s, want %s\n%s", i, gotIDs[i], wantIDs[i], summary)
		}
	}
	if !allStored {
		t.Fatalf("an answer is not a stored, unblocked %s\n%s", bpWarningType, summary)
	}

	// The stall really happened.
	if lockErr != nil || tAcq.IsZero() || tRel.IsZero() {
		t.Fatalf("the write lock was not held\n%s", summary)
	}
	sentBefore, answeredBefore := 0, 0
	for _, x := range sentAt {
		if x.Before(tRel) {
			sentBefore++
		}
	}
	for _, x := range answerAt {
		if x.Before(tRel) {
			answeredBefore++
		}
	}
	if sentBefore <= bpLockBefore || sentBefore <= answeredBefore {
		t.Fatalf("%d events sent and %d answered before the release: no events in flight during the stall\n%s",
			sentBefore, answeredBefore, summary)
	}
	points := append([]time.Time{started}, answerAt...)
	var stall time.Duration
	for i := 1; i < len(points); i++ {
		if points[i-1].Before(tRel) && points[i].After(tAcq) {
			if g := points[i].Sub(points[i-1]); g > stall {
				stall = g
			}
		}
	}
	if stall < bpMinStall {
		t.Fatalf("answers paused only %v while the lock was held\n%s", stall, summary)
	}

	// Other calls on the same connection went on during the stall.
	var during []time.Time
	for _, s := range side {
		if !s.ok {
			t.Fatalf("a side call failed\n%s", summary)
		}
		if !s.end.Before(tAcq) && !s.end.After(tRel) {
			during = append(during, s.end)
		}
	}
	sort.Slice(during, func(i, j int) bool { return during[i].Before(during[j]) })
	marks := append(append([]time.Time{tAcq}, during...), tRel)
	var worst time.Duration
	for i := 1; i < len(marks); i++ {
		if g := marks[i].Sub(marks[i-1]); g > worst {
			worst = g
		}
	}
	if worst > bpSideMaxGap {
		t.Fatalf("%d side calls completed during the stall, longest gap without one %v\n%s", len(during), worst, summary)
	}

	// Never disconnected: one connection, never closed, always READY, no GOAWAY in grpc-go's
	// log or the server's.
	if begun != 1 || endedConns != 0 || len(statesCopy) != 0 {
		t.Fatalf("the connection was not kept\n%s", summary)
	}
	low := strings.ToLower(strings.Join(logLines, "\n") + "\n" + stderr)
	for _, f := range forbidden {
		if strings.Contains(low, f) {
			t.Fatalf("%q was logged\n%s", f, summary)
		}
	}

	t.Logf("grpc-go: %d answers in %s s; lock held %.2f s; answers paused %.2f s; %d events sent and %d answered "+
		"before the release; %d side calls OK during the stall (longest gap %.2f s); %d connection",
		bpEvents, rel(ended), tRel.Sub(tAcq).Seconds(), stall.Seconds(), sentBefore, answeredBefore,
		len(during), worst.Seconds(), begun)
}
