package com.fleetevents.example;

import com.fleetevents.v1.AccessServiceGrpc;
import com.fleetevents.v1.CatalogServiceGrpc;
import com.fleetevents.v1.Classification;
import com.fleetevents.v1.Event;
import com.fleetevents.v1.EventServiceGrpc;
import com.fleetevents.v1.Outcome;
import com.fleetevents.v1.QueryEventsRequest;
import com.fleetevents.v1.QueryEventsResponse;
import com.fleetevents.v1.RegisterEventTypeRequest;
import com.fleetevents.v1.Severity;
import com.fleetevents.v1.SubscribeRequest;
import com.fleetevents.v1.WhoAmIRequest;
import com.fleetevents.v1.WhoAmIResponse;
import com.google.protobuf.Any;
import com.google.rpc.BadRequest;
import com.google.rpc.ErrorInfo;
import io.grpc.CallCredentials;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ChannelCredentials;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.CompositeChannelCredentials;
import io.grpc.ForwardingClientCall;
import io.grpc.ForwardingClientCallListener;
import io.grpc.Grpc;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.ClientCallStreamObserver;
import io.grpc.stub.ClientResponseObserver;
import io.grpc.stub.StreamObserver;
import java.io.File;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.Executor;
import java.util.concurrent.TimeUnit;

/**
 * A fleet-events client in Java (grpc-java): TLS with the server's CA pinned, a bearer token,
 * and each EventService call once. It prints one line per step and exits 1 at the first
 * surprise.
 *
 * <p>Arguments {@code --server HOST:PORT --ca FILE --token TOKEN}, or the environment variables
 * FLEET_EVENTS_SERVER, FLEET_EVENTS_CA and FLEET_EVENTS_TOKEN.
 */
public final class Example {
  private static final String EVENT_TYPE = "EXAMPLE_DISK_CLONED";
  private static final int STREAM_EVENTS = 5;
  private static final long TIMEOUT_SECS = 10;
  private static final Metadata.Key<String> AUTHORIZATION =
      Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);

  /** Sends {@code authorization: Bearer <token>} on every call. */
  static final class BearerToken extends CallCredentials {
    private final String token;

    BearerToken(String token) {
      this.token = token;
    }

    @Override
    public void applyRequestMetadata(RequestInfo info, Executor executor, MetadataApplier applier) {
      Metadata headers = new Metadata();
      headers.put(AUTHORIZATION, "Bearer " + token);
      applier.apply(headers);
    }
  }

  public static void main(String[] args) throws Exception {
    Map<String, String> opts = new HashMap<>();
    for (int i = 0; i + 1 < args.length; i += 2) {
      opts.put(args[i].replaceFirst("^--", ""), args[i + 1]);
    }
    String server = option(opts, "server", "FLEET_EVENTS_SERVER", "127.0.0.1:50051");
    String ca = option(opts, "ca", "FLEET_EVENTS_CA", "fleet-events-data/ca.pem");
    String token = option(opts, "token", "FLEET_EVENTS_TOKEN", "");
    if (token.isEmpty()) {
      fail("connect: no token (--token or FLEET_EVENTS_TOKEN)");
    }
    String addr = server.replaceFirst("^https://", ""); // the CLI's form is accepted too

    // 1. TLS that trusts only the server's own CA, plus the bearer token on every call.
    ChannelCredentials tls = TlsChannelCredentials.newBuilder().trustManager(new File(ca)).build();
    ManagedChannel channel =
        Grpc.newChannelBuilder(addr, CompositeChannelCredentials.create(tls, new BearerToken(token)))
            .build();
    try {
      run(channel, addr);
    } catch (StatusRuntimeException | ExecutionException e) {
      Status status = Status.fromThrowable(e);
      fail(status.getCode() + ": " + status.getDescription());
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }

  static void run(ManagedChannel channel, String addr) throws Exception {
    EventServiceGrpc.EventServiceBlockingStub events =
        EventServiceGrpc.newBlockingStub(channel).withDeadlineAfter(30, TimeUnit.SECONDS);
    EventServiceGrpc.EventServiceStub eventsAsync = EventServiceGrpc.newStub(channel);

    WhoAmIResponse me =
        AccessServiceGrpc.newBlockingStub(channel)
            .withDeadlineAfter(TIMEOUT_SECS, TimeUnit.SECONDS)
            .whoAmI(WhoAmIRequest.getDefaultInstance());
    System.out.printf(
        "connect server=%s kind=%s name=%s role=%s%n", addr, me.getKind(), me.getName(), me.getRole());

    // The application's own event type (clients may not send the server's KLSRV_* types).
    String result = "created";
    try {
      CatalogServiceGrpc.newBlockingStub(channel)
          .withDeadlineAfter(TIMEOUT_SECS, TimeUnit.SECONDS)
          .registerEventType(
              RegisterEventTypeRequest.newBuilder()
                  .setEventType(EVENT_TYPE)
                  .setSeverity(Severity.SEVERITY_WARNING)
                  .setDisplayName("Disk cloned (example)")
                  .setApplication("fleet-events examples")
                  .build());
    } catch (StatusRuntimeException e) {
      if (e.getStatus().getCode() != Status.Code.ALREADY_EXISTS) {
        throw e;
      }
      result = "exists";
    }
    System.out.printf("register event_type=%s result=%s%n", EVENT_TYPE, result);

    // A device of our own, so that the query below counts only this run's events.
    String device = "example-java-" + System.nanoTime();

    // 2. Unary Classify.
    Classification c = events.classify(event(device, "classify-1"));
    if (c.getOutcome() != Outcome.OUTCOME_STORED) {
      fail("classify: outcome " + c.getOutcome() + ", want OUTCOME_STORED");
    }
    System.out.printf(
        "classify event_id=%s outcome=%s severity=%s display_name=\"%s\"%n",
        c.getEventId(), c.getOutcome(), c.getSeverity(), c.getDisplayName());

    // 3. Bidi Stream: exactly one answer per event, in order.
    List<Event> sent = new ArrayList<>();
    List<Classification> answers = new ArrayList<>();
    CompletableFuture<Void> streamDone = new CompletableFuture<>();
    StreamObserver<Event> requests =
        eventsAsync
            .withDeadlineAfter(TIMEOUT_SECS, TimeUnit.SECONDS)
            .stream(
                new StreamObserver<Classification>() {
                  @Override
                  public void onNext(Classification answer) {
                    answers.add(answer);
                  }

                  @Override
                  public void onError(Throwable t) {
                    streamDone.completeExceptionally(t);
                  }

                  @Override
                  public void onCompleted() {
                    streamDone.complete(null);
                  }
                });
    for (int i = 1; i <= STREAM_EVENTS; i++) {
      Event e = event(device, "stream-" + i);
      sent.add(e);
      requests.onNext(e);
    }
    requests.onCompleted();
    streamDone.get(TIMEOUT_SECS, TimeUnit.SECONDS); // happens-before: answers is complete
    if (answers.size() != sent.size()) {
      fail("stream: " + answers.size() + " answers to " + sent.size() + " events");
    }
    int stored = 0;
    for (int i = 0; i < sent.size(); i++) {
      if (!answers.get(i).getEventId().equals(sent.get(i).getEventId())) {
        fail("stream: answer " + (i + 1) + " is for " + answers.get(i).getEventId());
      }
      if (answers.get(i).getOutcome() == Outcome.OUTCOME_STORED) {
        stored++;
      }
    }
    System.out.printf(
        "stream sent=%d received=%d in_order=true stored=%d%n", sent.size(), answers.size(), stored);

    // 4. A resend of an event already taken (same device_id and event_id).
    Classification dup = events.classify(sent.get(0));
    if (dup.getOutcome() != Outcome.OUTCOME_DUPLICATE) {
      fail("duplicate: outcome " + dup.getOutcome() + ", want OUTCOME_DUPLICATE");
    }
    System.out.printf("duplicate event_id=%s outcome=%s%n", dup.getEventId(), dup.getOutcome());

    // 5. Subscribe: registered once the response headers arrive; then one more event.
    CountDownLatch headers = new CountDownLatch(1);
    CompletableFuture<Classification> first = new CompletableFuture<>();
    CompletableFuture<ClientCallStreamObserver<SubscribeRequest>> call = new CompletableFuture<>();
    eventsAsync
        .withDeadlineAfter(TIMEOUT_SECS, TimeUnit.SECONDS)
        .withInterceptors(onHeaders(headers))
        .subscribe(
            SubscribeRequest.newBuilder().addDeviceIds(device).build(),
            new ClientResponseObserver<SubscribeRequest, Classification>() {
              @Override
              public void beforeStart(ClientCallStreamObserver<SubscribeRequest> stream) {
                call.complete(stream);
              }

              @Override
              public void onNext(Classification event) {
                first.complete(event);
              }

              @Override
              public void onError(Throwable t) {
                first.completeExceptionally(t);
              }

              @Override
              public void onCompleted() {
                first.completeExceptionally(new IllegalStateException("subscription ended"));
              }
            });
    if (!headers.await(TIMEOUT_SECS, TimeUnit.SECONDS)) {
      fail("subscribe: no response headers");
    }
    events.classify(event(device, "live-1"));
    Classification live = first.get(TIMEOUT_SECS, TimeUnit.SECONDS);
    call.get().cancel("received what we waited for", null);
    if (!live.getEventId().equals("live-1")) {
      fail("subscribe: received " + live.getEventId() + ", want live-1");
    }
    System.out.printf("subscribe event_id=%s received=true%n", live.getEventId());

    // 6. QueryEvents, two per page, following next_page_token to the end.
    QueryEventsRequest.Builder query = QueryEventsRequest.newBuilder().setDeviceId(device).setPageSize(2);
    int count = 0;
    int pages = 0;
    while (true) {
      QueryEventsResponse page = events.queryEvents(query.build());
      count += page.getEventsCount();
      pages++;
      if (page.getNextPageToken().isEmpty()) {
        break;
      }
      query.setPageToken(page.getNextPageToken());
    }
    if (count != 1 + STREAM_EVENTS + 1) {
      fail("query: " + count + " events, want " + (1 + STREAM_EVENTS + 1));
    }
    System.out.printf("query page_size=2 pages=%d count=%d%n", pages, count);

    // 7. A bad event: INVALID_ARGUMENT with google.rpc details (grpc-status-details-bin).
    StatusRuntimeException refusal = null;
    try {
      events.classify(event(device, "bad-1").toBuilder().clearDeviceId().build());
    } catch (StatusRuntimeException e) {
      refusal = e;
    }
    if (refusal == null || refusal.getStatus().getCode() != Status.Code.INVALID_ARGUMENT) {
      fail("invalid: got " + (refusal == null ? "an answer" : refusal.getStatus()) + ", want INVALID_ARGUMENT");
    }
    com.google.rpc.Status status = StatusProto.fromThrowable(refusal); // null without the trailer
    List<String> fields = new ArrayList<>();
    String reason = "";
    String domain = "";
    for (Any detail : status == null ? List.<Any>of() : status.getDetailsList()) {
      if (detail.is(BadRequest.class)) {
        detail.unpack(BadRequest.class).getFieldViolationsList().forEach(v -> fields.add(v.getField()));
      } else if (detail.is(ErrorInfo.class)) {
        ErrorInfo info = detail.unpack(ErrorInfo.class);
        reason = info.getReason();
        domain = info.getDomain();
      }
    }
    String field = String.join(",", fields);
    if (!field.equals("device_id") || !reason.equals("INVALID_FIELD") || !domain.equals("fleet-events")) {
      fail("invalid: details field=" + field + " reason=" + reason + " domain=" + domain);
    }
    System.out.printf(
        "invalid code=%s field=%s reason=%s domain=%s%n",
        refusal.getStatus().getCode(), field, reason, domain);
    System.out.println("done");
  }

  private static Event event(String device, String eventId) {
    return Event.newBuilder()
        .setEventId(eventId)
        .setDeviceId(device)
        .setEventType(EVENT_TYPE)
        .putParams("fingerprint", "hw-42")
        .build();
  }

  /** Counts {@code latch} down when a call's response headers arrive. */
  private static ClientInterceptor onHeaders(CountDownLatch latch) {
    return new ClientInterceptor() {
      @Override
      public <Q, R> ClientCall<Q, R> interceptCall(
          MethodDescriptor<Q, R> method, CallOptions options, Channel next) {
        return new ForwardingClientCall.SimpleForwardingClientCall<Q, R>(next.newCall(method, options)) {
          @Override
          public void start(Listener<R> listener, Metadata headers) {
            super.start(
                new ForwardingClientCallListener.SimpleForwardingClientCallListener<R>(listener) {
                  @Override
                  public void onHeaders(Metadata responseHeaders) {
                    latch.countDown();
                    super.onHeaders(responseHeaders);
                  }
                },
                headers);
          }
        };
      }
    };
  }

  private static String option(Map<String, String> opts, String name, String env, String fallback) {
    String value = opts.get(name);
    if (value == null || value.isEmpty()) {
      value = System.getenv(env);
    }
    return value == null || value.isEmpty() ? fallback : value;
  }

  private static void fail(String message) {
    System.err.println("FAIL " + message);
    System.out.flush();
    System.exit(1);
  }
}
