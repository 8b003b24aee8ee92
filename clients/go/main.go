// A fleet-events client in Go (grpc-go): TLS with the server's CA pinned, a bearer token, and
// each EventService call once. It prints one line per step and exits 1 at the first surprise.
//
//	go run . --server 127.0.0.1:50051 --ca fleet-events-data/ca.pem --token "$(cat fleet-events-data/admin.token)"
//
// or set FLEET_EVENTS_SERVER, FLEET_EVENTS_CA and FLEET_EVENTS_TOKEN.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	pb "github.com/fleet-events/fleet-events/clients/go/gen/fleetevents/v1"
)

const (
	eventType    = "EXAMPLE_DISK_CLONED"
	streamEvents = 5
)

// bearerToken sends `authorization: Bearer <token>` on every call, over TLS only.
type bearerToken string

func (t bearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(t)}, nil
}

func (bearerToken) RequireTransportSecurity() bool { return true }

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "FAIL "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	server := flag.String("server", envOr("FLEET_EVENTS_SERVER", "127.0.0.1:50051"), "HOST:PORT of the server")
	caFile := flag.String("ca", envOr("FLEET_EVENTS_CA", "fleet-events-data/ca.pem"), "the server's CA (PEM) to pin")
	token := flag.String("token", os.Getenv("FLEET_EVENTS_TOKEN"), "bearer token (better: FLEET_EVENTS_TOKEN)")
	flag.Parse()
	if *token == "" {
		fail("connect: no token (--token or FLEET_EVENTS_TOKEN)")
	}
	// The CLI's form https://HOST:PORT is accepted too.
	addr := strings.TrimPrefix(*server, "https://")

	// 1. TLS that trusts only the server's own CA, plus the bearer token on every call.
	tlsCreds, err := credentials.NewClientTLSFromFile(*caFile, "")
	if err != nil {
		fail("connect: %v", err)
	}
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(tlsCreds),
		grpc.WithPerRPCCredentials(bearerToken(*token)))
	if err != nil {
		fail("connect: %v", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	events := pb.NewEventServiceClient(conn)

	me, err := pb.NewAccessServiceClient(conn).WhoAmI(ctx, &pb.WhoAmIRequest{})
	if err != nil {
		fail("connect: WhoAmI: %v", err)
	}
	fmt.Printf("connect server=%s kind=%s name=%s role=%s\n", addr, me.GetKind(), me.GetName(), me.GetRole())

	// The application's own event type (clients may not send the server's KLSRV_* types).
	result := "created"
	_, err = pb.NewCatalogServiceClient(conn).RegisterEventType(ctx, &pb.RegisterEventTypeRequest{
		EventType:   eventType,
		Severity:    pb.Severity_SEVERITY_WARNING,
		DisplayName: "Disk cloned (example)",
		Application: "fleet-events examples",
	})
	if status.Code(err) == codes.AlreadyExists {
		result = "exists"
	} else if err != nil {
		fail("register: %v", err)
	}
	fmt.Printf("register event_type=%s result=%s\n", eventType, result)

	// A device of our own, so that the query below counts only this run's events.
	device := fmt.Sprintf("example-go-%d", time.Now().UnixNano())
	event := func(id string) *pb.Event {
		return &pb.Event{EventId: id, DeviceId: device, EventType: eventType,
			Params: map[string]string{"fingerprint": "hw-42"}}
	}

	// 2. Unary Classify.
	c, err := events.Classify(ctx, event("classify-1"))
	if err != nil {
		fail("classify: %v", err)
	}
	if c.GetOutcome() != pb.Outcome_OUTCOME_STORED {
		fail("classify: outcome %s, want OUTCOME_STORED", c.GetOutcome())
	}
	fmt.Printf("classify event_id=%s outcome=%s severity=%s display_name=%q\n",
		c.GetEventId(), c.GetOutcome(), c.GetSeverity(), c.GetDisplayName())

	// 3. Bidi Stream: exactly one answer per event, in order.
	stream, err := events.Stream(ctx)
	if err != nil {
		fail("stream: %v", err)
	}
	sent := make([]*pb.Event, streamEvents)
	for i := range sent {
		sent[i] = event(fmt.Sprintf("stream-%d", i+1))
		if err := stream.Send(sent[i]); err != nil {
			fail("stream: send: %v", err)
		}
	}
	if err := stream.CloseSend(); err != nil {
		fail("stream: close: %v", err)
	}
	stored := 0
	for i := range sent {
		answer, err := stream.Recv()
		if err != nil {
			fail("stream: answer %d: %v", i+1, err)
		}
		if answer.GetEventId() != sent[i].GetEventId() {
			fail("stream: answer %d is for %q, want %q", i+1, answer.GetEventId(), sent[i].GetEventId())
		}
		if answer.GetOutcome() == pb.Outcome_OUTCOME_STORED {
			stored++
		}
	}
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		fail("stream: want the end of the stream after %d answers, got %v", streamEvents, err)
	}
	fmt.Printf("stream sent=%d received=%d in_order=true stored=%d\n", streamEvents, streamEvents, stored)

	// 4. A resend of an event already taken (same device_id and event_id).
	dup, err := events.Classify(ctx, sent[0])
	if err != nil {
		fail("duplicate: %v", err)
	}
	if dup.GetOutcome() != pb.Outcome_OUTCOME_DUPLICATE {
		fail("duplicate: outcome %s, want OUTCOME_DUPLICATE", dup.GetOutcome())
	}
	fmt.Printf("duplicate event_id=%s outcome=%s\n", dup.GetEventId(), dup.GetOutcome())

	// 5. Subscribe: registered once the response headers arrive; then one more event.
	subCtx, stopSub := context.WithCancel(ctx)
	sub, err := events.Subscribe(subCtx, &pb.SubscribeRequest{DeviceIds: []string{device}})
	if err != nil {
		fail("subscribe: %v", err)
	}
	if _, err := sub.Header(); err != nil {
		fail("subscribe: headers: %v", err)
	}
	if _, err := events.Classify(ctx, event("live-1")); err != nil {
		fail("subscribe: classify: %v", err)
	}
	live, err := sub.Recv()
	if err != nil {
		fail("subscribe: %v", err)
	}
	stopSub()
	if live.GetEventId() != "live-1" {
		fail("subscribe: received %q, want live-1", live.GetEventId())
	}
	fmt.Printf("subscribe event_id=%s received=true\n", live.GetEventId())

	// 6. QueryEvents, two per page, following next_page_token to the end.
	query := &pb.QueryEventsRequest{DeviceId: device, PageSize: 2}
	count, pages := 0, 0
	for {
		page, err := events.QueryEvents(ctx, query)
		if err != nil {
			fail("query: %v", err)
		}
		count += len(page.GetEvents())
		pages++
		if page.GetNextPageToken() == "" {
			break
		}
		query.PageToken = page.GetNextPageToken()
	}
	if want := 1 + streamEvents + 1; count != want {
		fail("query: %d events, want %d", count, want)
	}
	fmt.Printf("query page_size=2 pages=%d count=%d\n", pages, count)

	// 7. A bad event: INVALID_ARGUMENT with google.rpc details (grpc-status-details-bin).
	bad := event("bad-1")
	bad.DeviceId = ""
	_, err = events.Classify(ctx, bad)
	st, _ := status.FromError(err)
	if st.Code() != codes.InvalidArgument {
		fail("invalid: got %v, want INVALID_ARGUMENT", err)
	}
	var field, reason, domain string
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				field = v.GetField()
			}
		case *errdetails.ErrorInfo:
			reason, domain = d.GetReason(), d.GetDomain()
		}
	}
	if field != "device_id" || reason != "INVALID_FIELD" || domain != "fleet-events" {
		fail("invalid: details field=%q reason=%q domain=%q (%s)", field, reason, domain, st.Message())
	}
	fmt.Printf("invalid code=%s field=%s reason=%s domain=%s\n", codeName(st.Code()), field, reason, domain)
	fmt.Println("done")
}

// codeName spells a status code the way the gRPC spec does (INVALID_ARGUMENT).
func codeName(c codes.Code) string {
	var b strings.Builder
	for i, r := range c.String() {
		if i > 0 && r >= 'A' && r <= 'Z' {
			b.WriteByte('_')
		}
		b.WriteRune(r)
	}
	return strings.ToUpper(b.String())
}
