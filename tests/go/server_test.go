// Package clienttests holds real grpc-go client tests of the fleet-events server. Shared
// helpers: start the real binary on a free port (as tests/python/conftest.py does), connect
// with its CA and admin token, compile the .proto at test time (no protoc, dynamic messages),
// hold the store's SQLite write lock, stop the server with SIGTERM.
//
// The binary is FLEET_EVENTS_BIN, default <repo>/target/release/fleet-events.
package clienttests

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bufbuild/protocompile"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/grpclog"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"
)

const (
	protoFile     = "fleetevents/v1/fleetevents.proto"
	readyDeadline = 30 * time.Second
	stopDeadline  = 15 * time.Second
	pollInterval  = 20 * time.Millisecond
	rpcTimeout    = 10 * time.Second
	dbFile        = "events.sqlite3"
)

var addrRE = regexp.MustCompile(`^\S+:\d+$`)

// ---- grpc-go's own log, kept to look for GOAWAY -----------------------------------------------

type capturedLog struct {
	mu    sync.Mutex
	lines []string
}

var grpcLog = &capturedLog{}

func (l *capturedLog) add(level string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, level+": "+fmt.Sprint(args...))
}
func (l *capturedLog) addf(level, format string, args ...any) {
	l.add(level, fmt.Sprintf(format, args...))
}
func (l *capturedLog) Info(args ...any)                    { l.add("INFO", args...) }
func (l *capturedLog) Infoln(args ...any)                  { l.add("INFO", args...) }
func (l *capturedLog) Infof(format string, args ...any)    { l.addf("INFO", format, args...) }
func (l *capturedLog) Warning(args ...any)                 { l.add("WARNING", args...) }
func (l *capturedLog) Warningln(args ...any)               { l.add("WARNING", args...) }
func (l *capturedLog) Warningf(format string, args ...any) { l.addf("WARNING", format, args...) }
func (l *capturedLog) Error(args ...any)                   { l.add("ERROR", args...) }
func (l *capturedLog) Errorln(args ...any)                 { l.add("ERROR", args...) }
func (l *capturedLog) Errorf(format string, args ...any)   { l.addf("ERROR", format, args...) }
func (l *capturedLog) Fatal(args ...any)                   { l.add("FATAL", args...); os.Exit(1) }
func (l *capturedLog) Fatalln(args ...any)                 { l.add("FATAL", args...); os.Exit(1) }
func (l *capturedLog) Fatalf(format string, args ...any) {
	l.addf("FATAL", format, args...)
	os.Exit(1)
}
func (l *capturedLog) V(int) bool { return true }

// since returns the lines logged from index n on.
func (l *capturedLog) since(n int) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.lines[n:]...)
}

func (l *capturedLog) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.lines)
}

func init() {
	grpclog.SetLoggerV2(grpcLog)
}

// ---- the contract, compiled at test time ----------------------------------------------------

type contract struct {
	file protoreflect.FileDescriptor
}

var (
	contractOnce sync.Once
	contractVal  contract
	contractErr  error
)

func repoRoot(t testing.TB) string {
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	return root
}

func loadContract(t testing.TB) contract {
	contractOnce.Do(func() {
		c := protocompile.Compiler{
			Resolver: protocompile.WithStandardImports(&protocompile.SourceResolver{
				ImportPaths: []string{filepath.Join(repoRoot(t), "proto")},
			}),
		}
		files, err := c.Compile(context.Background(), protoFile)
		if err != nil {
			contractErr = err
			return
		}
		contractVal = contract{file: files[0]}
	})
	if contractErr != nil {
		t.Fatalf("compiling %s: %v", protoFile, contractErr)
	}
	return contractVal
}

// msg makes a message of the package's type `name` with the given scalar fields set
// (string, uint32, int32 for enums, bool).
func (c contract) msg(t testing.TB, name string, fields map[string]any) *dynamicpb.Message {
	md := c.file.Messages().ByName(protoreflect.Name(name))
	if md == nil {
		t.Fatalf("no message %s in %s", name, protoFile)
	}
	m := dynamicpb.NewMessage(md)
	for k, v := range fields {
		fd := md.Fields().ByName(protoreflect.Name(k))
		if fd == nil {
			t.Fatalf("no field %s in %s", k, name)
		}
		var val protoreflect.Value
		switch x := v.(type) {
		case string:
			val = protoreflect.ValueOfString(x)
		case uint32:
			val = protoreflect.ValueOfUint32(x)
		case bool:
			val = protoreflect.ValueOfBool(x)
		case protoreflect.EnumNumber:
			val = protoreflect.ValueOfEnum(x)
		default:
			t.Fatalf("field %s: unsupported value %T", k, v)
		}
		m.Set(fd, val)
	}
	return m
}

func (c contract) empty(t testing.TB, name string) *dynamicpb.Message {
	return c.msg(t, name, nil)
}

// enumValue is the number of an enum value of the package, e.g. enumValue("Severity", "SEVERITY_WARNING").
func (c contract) enumValue(t testing.TB, enum, value string) protoreflect.EnumNumber {
	ed := c.file.Enums().ByName(protoreflect.Name(enum))
	if ed == nil {
		t.Fatalf("no enum %s", enum)
	}
	v := ed.Values().ByName(protoreflect.Name(value))
	if v == nil {
		t.Fatalf("no value %s in %s", value, enum)
	}
	return v.Number()
}

func getString(m *dynamicpb.Message, field string) string {
	return m.Get(m.Descriptor().Fields().ByName(protoreflect.Name(field))).String()
}

func getBool(m *dynamicpb.Message, field string) bool {
	return m.Get(m.Descriptor().Fields().ByName(protoreflect.Name(field))).Bool()
}

func getEnum(m *dynamicpb.Message, field string) protoreflect.EnumNumber {
	return m.Get(m.Descriptor().Fields().ByName(protoreflect.Name(field))).Enum()
}

// ---- the server process ---------------------------------------------------------------------

type fleetServer struct {
	workdir    string
	dataDir    string
	readyFile  string
	stderrPath string
	cmd        *exec.Cmd
	exited     chan struct{}
	waitErr    error
	address    string
	caPEM      []byte
	token      string
}

func serverBinary(t testing.TB) string {
	if b := os.Getenv("FLEET_EVENTS_BIN"); b != "" {
		return b
	}
	return filepath.Join(repoRoot(t), "target", "release", "fleet-events")
}

func (s *fleetServer) dbPath() string { return filepath.Join(s.dataDir, dbFile) }

func (s *fleetServer) stderrText(limit int) string {
	b, err := os.ReadFile(s.stderrPath)
	if err != nil {
		return "<no stderr>"
	}
	if len(b) > limit {
		b = b[len(b)-limit:]
	}
	return string(b)
}

// startServer starts the binary with the TOML config, waits for its ready file and health
// SERVING; t.Cleanup stops it with SIGTERM and requires exit code 0.
func startServer(t *testing.T, config string) *fleetServer {
	t.Helper()
	bin := serverBinary(t)
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("server binary %s: %v (set FLEET_EVENTS_BIN)", bin, err)
	}
	work := t.TempDir()
	s := &fleetServer{
		workdir:    work,
		dataDir:    filepath.Join(work, "data"),
		readyFile:  filepath.Join(work, "ready"),
		stderrPath: filepath.Join(work, "stderr.log"),
		exited:     make(chan struct{}),
	}
	if err := os.Mkdir(s.dataDir, 0o755); err != nil {
		t.Fatal(err)
	}
	configPath := filepath.Join(work, "config.toml")
	if err := os.WriteFile(configPath, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	stderr, err := os.Create(s.stderrPath)
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	stdout, err := os.Create(filepath.Join(work, "stdout.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer stdout.Close()
	s.cmd = exec.Command(bin, "serve", "--listen", "127.0.0.1:0", "--data-dir", s.dataDir,
		"--ready-file", s.readyFile, "--config", configPath)
	s.cmd.Stdout, s.cmd.Stderr = stdout, stderr
	// FLEET_EVENTS_* of the caller (FLEET_EVENTS_BIN) would be read as config overrides.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "FLEET_EVENTS_") {
			s.cmd.Env = append(s.cmd.Env, kv)
		}
	}
	s.cmd.Env = append(s.cmd.Env, "RUST_BACKTRACE=1")
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", bin, err)
	}
	go func() {
		s.waitErr = s.cmd.Wait()
		close(s.exited)
	}()
	t.Cleanup(func() { s.stop(t) })

	deadline := time.Now().Add(readyDeadline)
	for {
		select {
		case <-s.exited:
			t.Fatalf("fleet-events exited (%v) before it was ready\n%s", s.waitErr, s.stderrText(20000))
		default:
		}
		if b, err := os.ReadFile(s.readyFile); err == nil {
			if a := strings.TrimSpace(string(b)); addrRE.MatchString(a) {
				s.address = a
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("fleet-events wrote no address into %s within %v\n%s", s.readyFile, readyDeadline, s.stderrText(20000))
		}
		time.Sleep(pollInterval)
	}
	if s.caPEM, err = os.ReadFile(filepath.Join(s.dataDir, "ca.pem")); err != nil {
		t.Fatal(err)
	}
	tok, err := os.ReadFile(filepath.Join(s.dataDir, "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	s.token = strings.TrimSpace(string(tok))
	if !strings.HasPrefix(s.token, "fet_") {
		t.Fatalf("admin.token does not hold a fet_ token")
	}

	conn := s.dial(t)
	defer conn.Close()
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	if st, err := healthCheck(ctx, conn, true); err != nil || st != "SERVING" {
		t.Fatalf("health check: %s %v\n%s", st, err, s.stderrText(20000))
	}
	return s
}

func (s *fleetServer) stop(t *testing.T) {
	select {
	case <-s.exited:
	default:
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
		case <-time.After(stopDeadline):
			_ = s.cmd.Process.Kill()
			<-s.exited
			t.Errorf("fleet-events did not exit within %v of SIGTERM\n%s", stopDeadline, s.stderrText(20000))
			return
		}
	}
	if s.waitErr != nil {
		t.Errorf("fleet-events after SIGTERM: %v (want exit code 0)\n%s", s.waitErr, s.stderrText(20000))
	}
}

// bearer sends the admin token on every call.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}
func (bearer) RequireTransportSecurity() bool { return true }

// dial makes one ClientConn (one HTTP/2 connection to the one address) pinning the server's
// CA and sending the admin token.
func (s *fleetServer) dial(t testing.TB, opts ...grpc.DialOption) *grpc.ClientConn {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(s.caPEM) {
		t.Fatal("ca.pem holds no certificate")
	}
	// The certificate names localhost and 127.0.0.1; SNI must be a host name.
	tlsCfg := &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
	all := append([]grpc.DialOption{
		grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)),
		grpc.WithPerRPCCredentials(bearer(s.token)),
	}, opts...)
	conn, err := grpc.NewClient("passthrough:///"+s.address, all...)
	if err != nil {
		t.Fatalf("grpc.NewClient: %v", err)
	}
	return conn
}

// ---- grpc.health.v1 (generated code shipped with grpc-go) ------------------------------------

// healthCheck calls Health/Check for the whole server; returns SERVING, NOT_SERVING, ...
func healthCheck(ctx context.Context, conn *grpc.ClientConn, waitForReady bool) (string, error) {
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{},
		grpc.WaitForReady(waitForReady))
	if err != nil {
		return "", err
	}
	return resp.GetStatus().String(), nil
}

// ---- the store's write lock -----------------------------------------------------------------

const lockScript = `
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], timeout=10.0, isolation_level=None)
con.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("ROLLBACK")
print("released", flush=True)
con.close()
`

// writeLock holds the SQLite write lock (BEGIN IMMEDIATE, in a python3 child) for hold.
type writeLock struct {
	acquired   chan struct{}
	released   chan struct{}
	done       chan struct{}
	acquiredAt time.Time
	releasedAt time.Time
	err        error
	stderr     strings.Builder
}

func holdWriteLock(dbPath string, hold time.Duration) *writeLock {
	l := &writeLock{acquired: make(chan struct{}), released: make(chan struct{}), done: make(chan struct{})}
	python := os.Getenv("PYTHON")
	if python == "" {
		python = "python3"
	}
	cmd := exec.Command(python, "-c", lockScript, dbPath, fmt.Sprintf("%.3f", hold.Seconds()))
	cmd.Stderr = &l.stderr
	out, err := cmd.StdoutPipe()
	if err == nil {
		err = cmd.Start()
	}
	if err != nil {
		l.err = err
		close(l.acquired)
		close(l.released)
		close(l.done)
		return l
	}
	go func() {
		defer close(l.done)
		sc := bufio.NewScanner(out)
		gotLock, gotRelease := false, false
		for sc.Scan() {
			switch strings.TrimSpace(sc.Text()) {
			case "locked":
				l.acquiredAt = time.Now()
				gotLock = true
				close(l.acquired)
			case "released":
				l.releasedAt = time.Now()
				gotRelease = true
				close(l.released)
			}
		}
		if err := cmd.Wait(); err != nil {
			l.err = fmt.Errorf("write-lock helper: %v: %s", err, l.stderr.String())
		} else if !gotLock || !gotRelease {
			l.err = fmt.Errorf("write-lock helper ended without locking and releasing: %s", l.stderr.String())
		}
		if !gotLock {
			close(l.acquired)
		}
		if !gotRelease {
			close(l.released)
		}
	}()
	return l
}
