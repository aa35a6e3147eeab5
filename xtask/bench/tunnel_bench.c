/*
 * tunnel_bench: the load client, the pod-side server and the plain TCP relay of
 * `cargo xtask bench`'s tunnel benchmark (compiled by the bench with cc -O2 -pthread).
 *
 *   tunnel_bench server --port PORT
 *       Listens on 0.0.0.0:PORT (inside the pod); one thread per connection. The server speaks
 *       first: one byte 'R' as soon as it has accepted (a greeting, which `ttfb` times). Then
 *       each connection sends a 9-byte header, a mode byte and a u64 (little-endian) argument,
 *       and the measured part starts (clients wait for the 'R' after sending the header):
 *         's' COUNT  sink: read COUNT bytes, then answer the count received (u64 LE);
 *         'e' 0      echo: write back everything read, until EOF;
 *         'o' COUNT  source: write COUNT bytes, then wait for the client to close.
 *       The sink needs no half-close (a v4 port-forward cannot carry one): the count in the
 *       header says when the data is complete.
 *
 *   tunnel_bench throughput --target IP:PORT --streams N --bytes TOTAL [--from-pod 1] [--timeout-s T]
 *       N connections in sink mode, each sending TOTAL/N bytes from its own thread in 128 KiB
 *       writes. Timed from the moment every stream has its 'R' until the last stream has its
 *       count back (so the data has reached the server, not just a local buffer). With
 *       --from-pod 1, in source mode instead: the server sends, each stream's thread reads its
 *       share, timed until the last byte arrived. Reports the process's CPU time too.
 *
 *   tunnel_bench rtt --target IP:PORT --count K [--size S] [--warmup W] [--timeout-s T]
 *       One connection (TCP_NODELAY) in echo mode: W untimed then K timed round trips of S
 *       bytes (write S, read S, check them); reports min/p50/p99/max/mean per round trip.
 *
 *   tunnel_bench ttfb --target IP:PORT --count K [--gap-ms G] [--timeout-s T]
 *       K connections one after the other (G ms apart, default 0): each times connect() up to
 *       the server's first byte (its 'R' greeting), then closes. Reports min/p50/p90/max/mean
 *       and every sample (microseconds), plus the connect() call alone.
 *
 *   tunnel_bench hold --target IP:PORT --conns N [--timeout-s T]
 *       N echo connections, one 64-byte round trip each (so each is carried end to end),
 *       prints {"ready":true,...}, holds them until a line (or EOF) on stdin, closes them.
 *
 *   tunnel_bench relay --listen-port PORT --target IP:PORT [--target-netns PATH]
 *       A plain TCP relay: listens on 127.0.0.1:PORT (0: any; the port is printed), and per
 *       connection dials TARGET (from inside the network namespace PATH if given, as a kubelet
 *       dials into a pod) and copies both ways with one thread per direction (128 KiB reads,
 *       TCP_NODELAY both sides), passing EOF on as a half-close.
 *
 * Every client mode prints one JSON object on stdout. Every wait is bounded: SO_RCVTIMEO and
 * SO_SNDTIMEO of T seconds on client sockets (default 60), and alarm(T + 10) on the process.
 * Errors go to stderr with a non-zero exit code.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (128 * 1024)
#define MAX_STREAMS 256
#define MAX_COUNT 10000000L
#define MAX_SIZE (1 << 20)

static void die(const char *what) {
    fprintf(stderr, "tunnel_bench: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void fail(const char *what) {
    fprintf(stderr, "tunnel_bench: %s\n", what);
    exit(1);
}

static void usage(void) {
    fprintf(stderr,
            "usage: tunnel_bench server --port PORT\n"
            "       tunnel_bench throughput --target IP:PORT --streams N --bytes TOTAL [--from-pod 1] [--timeout-s T]\n"
            "       tunnel_bench rtt --target IP:PORT --count K [--size S] [--warmup W] [--timeout-s T]\n"
            "       tunnel_bench ttfb --target IP:PORT --count K [--gap-ms G] [--timeout-s T]\n"
            "       tunnel_bench hold --target IP:PORT --conns N [--timeout-s T]\n"
            "       tunnel_bench relay --listen-port PORT --target IP:PORT [--target-netns PATH]\n");
    exit(2);
}

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long parse_ll(const char *s, long long lo, long long hi) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < lo || v > hi) usage();
    return v;
}

static struct sockaddr_in parse_addr(const char *s) {
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof host) usage();
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)parse_ll(colon + 1, 1, 65535))};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) usage();
    return a;
}

static int write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reads exactly len bytes; -1 on error or early EOF. */
static int read_all(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len > 0) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int timeout_s = 60;

/* Connects, sends the header, waits for 'R'. */
static int open_stream(struct sockaddr_in target, char mode, uint64_t arg) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    struct timeval tv = {.tv_sec = timeout_s};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    set_nodelay(fd);
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0) die("connect");
    unsigned char hdr[9];
    hdr[0] = (unsigned char)mode;
    for (int i = 0; i < 8; i++) hdr[1 + i] = (unsigned char)(arg >> (8 * i));
    if (write_all(fd, hdr, sizeof hdr) < 0) die("sending the header");
    char r;
    if (read_all(fd, &r, 1) < 0) die("waiting for the server's ready byte");
    if (r != 'R') fail("the server did not answer 'R'");
    return fd;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int64_t pct(const int64_t *sorted, long n, double p) {
    long i = (long)(p / 100.0 * (double)n + 0.5) - 1;
    if (i < 0) i = 0;
    if (i >= n) i = n - 1;
    return sorted[i];
}

/* ---------------------------------------------------------------- server */

static void *serve_conn(void *arg) {
    int fd = (int)(intptr_t)arg;
    char *buf = malloc(CHUNK);
    unsigned char hdr[9];
    if (!buf) goto out;
    set_nodelay(fd);
    /* The greeting first: a client that only connects sees the server's first byte at once. */
    if (write_all(fd, "R", 1) < 0) goto out;
    if (read_all(fd, hdr, sizeof hdr) < 0) goto out;
    uint64_t count = 0;
    for (int i = 0; i < 8; i++) count |= (uint64_t)hdr[1 + i] << (8 * i);
    if (hdr[0] == 's') {
        uint64_t got = 0;
        while (got < count) {
            size_t want = count - got < CHUNK ? (size_t)(count - got) : CHUNK;
            ssize_t n = read(fd, buf, want);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            got += (uint64_t)n;
        }
        unsigned char ack[8];
        for (int i = 0; i < 8; i++) ack[i] = (unsigned char)(got >> (8 * i));
        write_all(fd, ack, sizeof ack);
        /* Wait for the client to close first (its EOF, or an error). */
        while (read(fd, buf, CHUNK) > 0) {}
    } else if (hdr[0] == 'o') {
        memset(buf, 0x3c, CHUNK);
        uint64_t left = count;
        while (left > 0) {
            size_t n = left < CHUNK ? (size_t)left : CHUNK;
            if (write_all(fd, buf, n) < 0) break;
            left -= n;
        }
        while (read(fd, buf, CHUNK) > 0) {}
    } else if (hdr[0] == 'e') {
        for (;;) {
            ssize_t n = read(fd, buf, CHUNK);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            if (write_all(fd, buf, (size_t)n) < 0) break;
        }
    }
out:
    free(buf);
    close(fd);
    return NULL;
}

static void spawn_detached(void *(*fn)(void *), void *arg) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    pthread_t t;
    if (pthread_create(&t, &attr, fn, arg) != 0) fail("pthread_create failed");
    pthread_attr_destroy(&attr);
}

static int listen_on(uint32_t addr, int port) {
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (l < 0) die("socket");
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(addr)};
    if (bind(l, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(l, 1024) < 0) die("listen");
    return l;
}

static _Noreturn void cmd_server(int port) {
    int l = listen_on(INADDR_ANY, port);
    for (;;) {
        int fd = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE) continue;
            die("accept");
        }
        spawn_detached(serve_conn, (void *)(intptr_t)fd);
    }
}

/* ---------------------------------------------------------------- relay */

struct pipe_half {
    int from, to;
};

static void *copy_half(void *arg) {
    struct pipe_half *h = arg;
    char *buf = malloc(CHUNK);
    if (!buf) fail("out of memory");
    for (;;) {
        ssize_t n = read(h->from, buf, CHUNK);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        if (write_all(h->to, buf, (size_t)n) < 0) break;
    }
    shutdown(h->to, SHUT_WR);
    free(buf);
    return NULL;
}

static struct sockaddr_in relay_target;
static int relay_netns = -1;

static void *relay_conn(void *arg) {
    int client = (int)(intptr_t)arg;
    /* setns affects this thread only: the upstream socket is created in the target namespace. */
    if (relay_netns >= 0 && setns(relay_netns, CLONE_NEWNET) < 0) {
        perror("tunnel_bench: relay: setns");
        close(client);
        return NULL;
    }
    int up = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (up < 0 || connect(up, (struct sockaddr *)&relay_target, sizeof relay_target) < 0) {
        perror("tunnel_bench: relay: connect");
        close(client);
        if (up >= 0) close(up);
        return NULL;
    }
    set_nodelay(client);
    set_nodelay(up);
    struct pipe_half down = {up, client}, upward = {client, up};
    pthread_t t;
    if (pthread_create(&t, NULL, copy_half, &down) != 0) fail("pthread_create failed");
    copy_half(&upward);
    pthread_join(t, NULL);
    close(client);
    close(up);
    return NULL;
}

static _Noreturn void cmd_relay(int port, struct sockaddr_in target, const char *netns) {
    relay_target = target;
    if (netns) {
        relay_netns = open(netns, O_RDONLY | O_CLOEXEC);
        if (relay_netns < 0) die("opening the target network namespace");
    }
    int l = listen_on(INADDR_LOOPBACK, port);
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    if (getsockname(l, (struct sockaddr *)&a, &len) < 0) die("getsockname");
    printf("{\"ready\":true,\"port\":%d}\n", ntohs(a.sin_port));
    fflush(stdout);
    for (;;) {
        int fd = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE) continue;
            die("accept");
        }
        spawn_detached(relay_conn, (void *)(intptr_t)fd);
    }
}

/* ---------------------------------------------------------------- clients */

struct stream {
    int fd;
    uint64_t bytes;
    uint64_t acked;
    int ok;
};

static pthread_barrier_t start_barrier;

static void *send_stream(void *arg) {
    struct stream *s = arg;
    char *buf = malloc(CHUNK);
    if (!buf) fail("out of memory");
    memset(buf, 0x5a, CHUNK);
    pthread_barrier_wait(&start_barrier);
    uint64_t left = s->bytes;
    while (left > 0) {
        size_t n = left < CHUNK ? (size_t)left : CHUNK;
        if (write_all(s->fd, buf, n) < 0) goto out;
        left -= n;
    }
    unsigned char ack[8];
    if (read_all(s->fd, ack, sizeof ack) < 0) goto out;
    for (int i = 0; i < 8; i++) s->acked |= (uint64_t)ack[i] << (8 * i);
    s->ok = s->acked == s->bytes;
out:
    free(buf);
    return NULL;
}

static void *recv_stream(void *arg) {
    struct stream *s = arg;
    char *buf = malloc(CHUNK);
    if (!buf) fail("out of memory");
    pthread_barrier_wait(&start_barrier);
    while (s->acked < s->bytes) {
        ssize_t n = read(s->fd, buf, CHUNK);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        s->acked += (uint64_t)n;
    }
    s->ok = s->acked == s->bytes;
    free(buf);
    return NULL;
}

static int cmd_throughput(struct sockaddr_in target, int streams, long long total, int from_pod) {
    static struct stream ss[MAX_STREAMS];
    pthread_t threads[MAX_STREAMS];
    int64_t t0 = now_ns();
    for (int i = 0; i < streams; i++) {
        ss[i].bytes = (uint64_t)(total / streams + (i < total % streams ? 1 : 0));
        ss[i].fd = open_stream(target, from_pod ? 'o' : 's', ss[i].bytes);
    }
    int64_t connected = now_ns();
    pthread_barrier_init(&start_barrier, NULL, (unsigned)streams + 1);
    for (int i = 0; i < streams; i++)
        if (pthread_create(&threads[i], NULL, from_pod ? recv_stream : send_stream, &ss[i]) != 0) fail("pthread_create failed");
    pthread_barrier_wait(&start_barrier);
    int64_t start = now_ns();
    for (int i = 0; i < streams; i++) pthread_join(threads[i], NULL);
    int64_t end = now_ns();
    for (int i = 0; i < streams; i++) {
        if (!ss[i].ok) {
            fprintf(stderr, "tunnel_bench: stream %d: sent %llu bytes, server counted %llu (%s)\n", i,
                    (unsigned long long)ss[i].bytes, (unsigned long long)ss[i].acked, strerror(errno));
            return 1;
        }
        close(ss[i].fd);
    }
    double secs = (double)(end - start) / 1e9;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
                 (double)ru.ru_stime.tv_usec / 1e6;
    printf("{\"mode\":\"throughput\",\"direction\":\"%s\",\"streams\":%d,\"bytes\":%lld,\"seconds\":%.6f,"
           "\"bytes_per_s\":%.0f,\"setup_s\":%.6f,\"cpu_s\":%.6f}\n",
           from_pod ? "from_pod" : "to_pod", streams, total, secs, (double)total / secs, (double)(connected - t0) / 1e9, cpu);
    return 0;
}

static int cmd_rtt(struct sockaddr_in target, long count, long size, long warmup) {
    int fd = open_stream(target, 'e', 0);
    char *out = malloc((size_t)size), *in = malloc((size_t)size);
    int64_t *t = malloc(sizeof(int64_t) * (size_t)count);
    if (!out || !in || !t) fail("out of memory");
    for (long i = 0; i < warmup + count; i++) {
        memset(out, (int)(i & 0xff), (size_t)size);
        int64_t a = now_ns();
        if (write_all(fd, out, (size_t)size) < 0) die("rtt: write");
        if (read_all(fd, in, (size_t)size) < 0) die("rtt: read");
        int64_t b = now_ns();
        if (memcmp(in, out, (size_t)size) != 0) fail("rtt: the echo differs from what was sent");
        if (i >= warmup) t[i - warmup] = b - a;
    }
    close(fd);
    double sum = 0;
    for (long i = 0; i < count; i++) sum += (double)t[i];
    qsort(t, (size_t)count, sizeof *t, cmp_i64);
    printf("{\"mode\":\"rtt\",\"count\":%ld,\"size\":%ld,\"min_ns\":%lld,\"p50_ns\":%lld,\"p99_ns\":%lld,"
           "\"max_ns\":%lld,\"mean_ns\":%.0f}\n",
           count, size, (long long)t[0], (long long)pct(t, count, 50), (long long)pct(t, count, 99),
           (long long)t[count - 1], sum / (double)count);
    return 0;
}

static int cmd_ttfb(struct sockaddr_in target, long count, long gap_ms) {
    int64_t *t = malloc(sizeof(int64_t) * (size_t)count), *c = malloc(sizeof(int64_t) * (size_t)count);
    if (!t || !c) fail("out of memory");
    for (long i = 0; i < count; i++) {
        if (i > 0 && gap_ms > 0) {
            struct timespec ts = {.tv_sec = gap_ms / 1000, .tv_nsec = (gap_ms % 1000) * 1000000L};
            while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
        }
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) die("socket");
        struct timeval tv = {.tv_sec = timeout_s};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        set_nodelay(fd);
        char r;
        int64_t a = now_ns();
        if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0) die("ttfb: connect");
        int64_t b = now_ns();
        if (read_all(fd, &r, 1) < 0) die("ttfb: waiting for the server's first byte");
        int64_t e = now_ns();
        if (r != 'R') fail("ttfb: the server's first byte is not 'R'");
        close(fd);
        t[i] = e - a;
        c[i] = b - a;
    }
    printf("{\"mode\":\"ttfb\",\"count\":%ld,\"gap_ms\":%ld,\"samples_us\":[", count, gap_ms);
    for (long i = 0; i < count; i++) printf("%s%.1f", i ? "," : "", (double)t[i] / 1e3);
    double sum = 0;
    for (long i = 0; i < count; i++) sum += (double)t[i];
    qsort(t, (size_t)count, sizeof *t, cmp_i64);
    qsort(c, (size_t)count, sizeof *c, cmp_i64);
    printf("],\"min_ns\":%lld,\"p50_ns\":%lld,\"p90_ns\":%lld,\"max_ns\":%lld,\"mean_ns\":%.0f,"
           "\"connect_p50_ns\":%lld}\n",
           (long long)t[0], (long long)pct(t, count, 50), (long long)pct(t, count, 90), (long long)t[count - 1],
           sum / (double)count, (long long)pct(c, count, 50));
    return 0;
}

static int cmd_hold(struct sockaddr_in target, int conns) {
    int *fds = malloc(sizeof(int) * (size_t)conns);
    char out[64], in[64];
    if (!fds) fail("out of memory");
    memset(out, 'h', sizeof out);
    for (int i = 0; i < conns; i++) {
        fds[i] = open_stream(target, 'e', 0);
        if (write_all(fds[i], out, sizeof out) < 0 || read_all(fds[i], in, sizeof in) < 0) die("hold: round trip");
    }
    printf("{\"ready\":true,\"conns\":%d}\n", conns);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) {}
    for (int i = 0; i < conns; i++) close(fds[i]);
    printf("{\"done\":true}\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    const char *mode = argv[1];
    const char *target_s = NULL, *netns = NULL;
    long long port = -1, streams = 1, bytes = -1, count = -1, size = 64, warmup = 100, conns = -1, gap_ms = 0, from_pod = 0;
    for (int i = 2; i < argc; i++) {
        if (i + 1 >= argc) usage();
        const char *k = argv[i], *v = argv[++i];
        if (!strcmp(k, "--port") || !strcmp(k, "--listen-port")) port = parse_ll(v, 0, 65535);
        else if (!strcmp(k, "--target")) target_s = v;
        else if (!strcmp(k, "--target-netns")) netns = v;
        else if (!strcmp(k, "--streams")) streams = parse_ll(v, 1, MAX_STREAMS);
        else if (!strcmp(k, "--bytes")) bytes = parse_ll(v, 1, 1LL << 40);
        else if (!strcmp(k, "--count")) count = parse_ll(v, 1, MAX_COUNT);
        else if (!strcmp(k, "--size")) size = parse_ll(v, 1, MAX_SIZE);
        else if (!strcmp(k, "--warmup")) warmup = parse_ll(v, 0, MAX_COUNT);
        else if (!strcmp(k, "--conns")) conns = parse_ll(v, 1, 10000);
        else if (!strcmp(k, "--gap-ms")) gap_ms = parse_ll(v, 0, 60000);
        else if (!strcmp(k, "--from-pod")) from_pod = parse_ll(v, 0, 1);
        else if (!strcmp(k, "--timeout-s")) timeout_s = (int)parse_ll(v, 1, 3600);
        else usage();
    }
    signal(SIGPIPE, SIG_IGN);
    if (!strcmp(mode, "server")) {
        if (port < 1) usage();
        cmd_server((int)port);
    }
    if (!strcmp(mode, "relay")) {
        if (port < 0 || !target_s) usage();
        cmd_relay((int)port, parse_addr(target_s), netns);
    }
    if (!target_s) usage();
    struct sockaddr_in target = parse_addr(target_s);
    /* The whole run is bounded, whatever happens (ttfb: every connection may take the timeout). */
    alarm((unsigned)timeout_s + 10 + (!strcmp(mode, "ttfb") && count > 0 ? (unsigned)(count * (gap_ms / 1000 + 1)) : 0));
    if (!strcmp(mode, "throughput")) {
        if (bytes < streams) usage();
        return cmd_throughput(target, (int)streams, bytes, (int)from_pod);
    }
    if (!strcmp(mode, "rtt")) {
        if (count < 1) usage();
        return cmd_rtt(target, count, size, warmup);
    }
    if (!strcmp(mode, "ttfb")) {
        if (count < 1) usage();
        return cmd_ttfb(target, count, gap_ms);
    }
    if (!strcmp(mode, "hold")) {
        if (conns < 1) usage();
        return cmd_hold(target, (int)conns);
    }
    usage();
}
