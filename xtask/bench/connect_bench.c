/*
 * connect_bench: the C-speed client of `cargo xtask bench` (compiled by the bench with cc -O2).
 *
 * It listens on 127.0.0.1:LISTEN_PORT itself, then does COUNT sequential connections to
 * TARGET_IP:TARGET_PORT, as fast as one thread can:
 *
 *     s = socket(); setsockopt(s, SO_LINGER 0); connect(s, TARGET); a = accept(listener);
 *     close(s); close(a);
 *
 * TARGET is either the listener itself (plain loopback) or a pod address that something
 * (beamredir's cgroup/connect4 program, or an iptables DNAT rule) sends to the listener. On
 * loopback the handshake completes inside connect(), so accept() does not wait, and the client
 * draining its own listener needs no second thread or process: the same single-threaded loop,
 * the same target server, for every case. SO_LINGER 0 makes close() send a RST, so no
 * TIME_WAIT sockets pile up and no ephemeral-port search slows later iterations down.
 *
 * TARGET may be IPv4 (`10.244.0.5:4369`) or IPv6 (`[fd00::5]:4369`); the listener is then on
 * the same family's loopback (127.0.0.1 or [::1]), so beamredir's connect4 or connect6 runs.
 *
 * Closed port: with --closed-target ADDR, a request can instead time connects to ADDR, where
 * nothing listens (directly, or after a redirect):
 *
 *     s = socket(); connect(s, ADDR) fails with ECONNREFUSED; close(s);
 *
 * With --count N: WARMUP untimed connections, then one timed batch of N. With --stdin: print
 * {"ready":true}, then run one batch per request line "COUNT WARMUP" (or "COUNT WARMUP closed")
 * until EOF, so a caller can interleave several clients (one per case) batch by batch without
 * starting processes.
 *
 * Output: one JSON object per batch on stdout, with
 *   per_connect_ns        the batch: (end - start) / COUNT, CLOCK_MONOTONIC over the whole loop
 *   iter_{min,median,p99,max}_ns    one whole iteration (socket .. both closes), per call
 *   connect_{min,median,p99,max}_ns the connect() call alone, per call
 * (one clock read per iteration plus two around connect(): tens of ns, the same in every case).
 * Errors go to stderr with a non-zero exit code. First of all, one checked connection proves
 * the target reaches the listener (the accepted peer is the client's own port), with a 2 s
 * send timeout so a missing redirect fails fast instead of retrying SYNs.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_COUNT 10000000L

static void usage(void) {
    fprintf(stderr,
            "usage: connect_bench --listen-port PORT --target ADDR [--closed-target ADDR] "
            "(--count N [--warmup N] | --stdin) [--cpu CPU]\n"
            "       ADDR: IPv4:PORT or [IPv6]:PORT\n");
    exit(2);
}

static void die(const char *what) {
    fprintf(stderr, "connect_bench: %s: %s\n", what, strerror(errno));
    exit(1);
}

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted array. */
static int64_t pct(const int64_t *sorted, long n, double p) {
    long i = (long)(p / 100.0 * (double)n + 0.5) - 1;
    if (i < 0) i = 0;
    if (i >= n) i = n - 1;
    return sorted[i];
}

static long parse_long(const char *s, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi) usage();
    return v;
}

/* An IPv4 or IPv6 socket address and its length. */
struct addr {
    struct sockaddr_storage ss;
    socklen_t len;
};

static struct addr parse_addr(const char *arg) {
    char ip[64];
    struct addr a;
    memset(&a, 0, sizeof a);
    const char *colon = strrchr(arg, ':');
    if (!colon || (size_t)(colon - arg) >= sizeof ip) usage();
    memcpy(ip, arg, (size_t)(colon - arg));
    ip[colon - arg] = 0;
    uint16_t port = htons((uint16_t)parse_long(colon + 1, 1, 65535));
    size_t n = strlen(ip);
    if (n >= 2 && ip[0] == '[' && ip[n - 1] == ']') {
        ip[n - 1] = 0;
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&a.ss;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = port;
        if (inet_pton(AF_INET6, ip + 1, &s6->sin6_addr) != 1) usage();
        a.len = sizeof *s6;
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&a.ss;
        s4->sin_family = AF_INET;
        s4->sin_port = port;
        if (inet_pton(AF_INET, ip, &s4->sin_addr) != 1) usage();
        a.len = sizeof *s4;
    }
    return a;
}

static uint16_t port_of(const struct sockaddr_storage *ss) {
    return ss->ss_family == AF_INET6 ? ((const struct sockaddr_in6 *)ss)->sin6_port
                                     : ((const struct sockaddr_in *)ss)->sin_port;
}

/* One connection: connect to target, accept it on the listener, close both. Returns the
 * connect() duration in ns. `check`: with a send timeout, and fail unless the accepted
 * connection is this one (its peer port is our local port). */
static int64_t one(int listener, const struct addr *target, int check) {
    static const struct linger lg = {1, 0};
    int s = socket(target->ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) die("socket");
    if (setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) < 0) die("setsockopt SO_LINGER");
    if (check) {
        struct timeval tv = {2, 0};
        if (setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0) die("setsockopt SO_SNDTIMEO");
    }
    int64_t t0 = now_ns();
    if (connect(s, (const struct sockaddr *)&target->ss, target->len) < 0) die("connect");
    int64_t t1 = now_ns();
    struct sockaddr_storage peer;
    socklen_t plen = sizeof peer;
    int a = accept4(listener, check ? (struct sockaddr *)&peer : NULL, check ? &plen : NULL, SOCK_CLOEXEC);
    if (a < 0) die("accept (did the connection reach the listener?)");
    if (check) {
        struct sockaddr_storage self;
        socklen_t slen = sizeof self;
        if (getsockname(s, (struct sockaddr *)&self, &slen) < 0) die("getsockname");
        if (port_of(&self) != port_of(&peer)) {
            fprintf(stderr, "connect_bench: the accepted connection (peer port %u) is not ours (port %u)\n",
                    ntohs(port_of(&peer)), ntohs(port_of(&self)));
            exit(1);
        }
    }
    close(s);
    close(a);
    return t1 - t0;
}

/* One connect to a closed port: it must fail with ECONNREFUSED. Returns the connect() duration.
 * `check`: with a 2 s send timeout, so a missing redirect (no route, or SYNs to nowhere) fails
 * fast and says so. */
static int64_t one_closed(const struct addr *target, int check) {
    int s = socket(target->ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) die("socket");
    if (check) {
        struct timeval tv = {2, 0};
        if (setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0) die("setsockopt SO_SNDTIMEO");
    }
    int64_t t0 = now_ns();
    int r = connect(s, (const struct sockaddr *)&target->ss, target->len);
    int64_t t1 = now_ns();
    if (r == 0 || errno != ECONNREFUSED) {
        if (r == 0) errno = 0;
        die("connect to the closed port (expected ECONNREFUSED)");
    }
    close(s);
    return t1 - t0;
}

/* One timed batch: `warmup` untimed connections, then `count` timed ones; prints the JSON line.
 * `closed`: connects to the closed target instead (no accept, no listener involved). */
static void batch(int l, const struct addr *target, const struct addr *closed_target, long count, long warmup,
                  int64_t *iter, int64_t *conn) {
    for (long i = 0; i < warmup; i++) {
        if (closed_target) one_closed(closed_target, 0);
        else one(l, target, 0);
    }
    for (long i = 0; i < count; i++) {
        iter[i] = now_ns();
        conn[i] = closed_target ? one_closed(closed_target, 0) : one(l, target, 0);
    }
    iter[count] = now_ns();
    int64_t total = iter[count] - iter[0];
    for (long i = 0; i < count; i++) iter[i] = iter[i + 1] - iter[i];
    qsort(iter, (size_t)count, sizeof *iter, cmp_i64);
    qsort(conn, (size_t)count, sizeof *conn, cmp_i64);
    printf("{\"mode\":\"%s\",\"count\":%ld,\"warmup\":%ld,\"batch_ns\":%lld,\"per_connect_ns\":%.1f,"
           "\"iter_min_ns\":%lld,\"iter_median_ns\":%lld,\"iter_p99_ns\":%lld,\"iter_max_ns\":%lld,"
           "\"connect_min_ns\":%lld,\"connect_median_ns\":%lld,\"connect_p99_ns\":%lld,\"connect_max_ns\":%lld}\n",
           closed_target ? "closed" : "open", count, warmup, (long long)total, (double)total / (double)count,
           (long long)iter[0], (long long)pct(iter, count, 50), (long long)pct(iter, count, 99),
           (long long)iter[count - 1],
           (long long)conn[0], (long long)pct(conn, count, 50), (long long)pct(conn, count, 99),
           (long long)conn[count - 1]);
    fflush(stdout);
}

int main(int argc, char **argv) {
    long listen_port = -1, count = -1, warmup = 1000, cpu = -1;
    int from_stdin = 0;
    const char *target_arg = NULL, *closed_arg = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--stdin")) { from_stdin = 1; continue; }
        if (i + 1 >= argc) usage();
        if (!strcmp(argv[i], "--listen-port")) listen_port = parse_long(argv[++i], 1, 65535);
        else if (!strcmp(argv[i], "--target")) target_arg = argv[++i];
        else if (!strcmp(argv[i], "--closed-target")) closed_arg = argv[++i];
        else if (!strcmp(argv[i], "--count")) count = parse_long(argv[++i], 1, MAX_COUNT);
        else if (!strcmp(argv[i], "--warmup")) warmup = parse_long(argv[++i], 0, MAX_COUNT);
        else if (!strcmp(argv[i], "--cpu")) cpu = parse_long(argv[++i], 0, CPU_SETSIZE - 1);
        else usage();
    }
    if (listen_port < 0 || !target_arg || (count < 0) == !from_stdin) usage();

    struct addr target = parse_addr(target_arg), closed = {0};
    if (closed_arg) {
        closed = parse_addr(closed_arg);
        if (closed.ss.ss_family != target.ss.ss_family) usage();
    }
    int family = target.ss.ss_family;

    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET((int)cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) < 0) die("sched_setaffinity");
    }

    int l = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (l < 0) die("socket");
    int on = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    struct timeval accept_timeout = {5, 0}; /* accept() never waits long: bounded anyway */
    if (setsockopt(l, SOL_SOCKET, SO_RCVTIMEO, &accept_timeout, sizeof accept_timeout) < 0) die("setsockopt SO_RCVTIMEO");
    struct sockaddr_storage la;
    socklen_t la_len;
    memset(&la, 0, sizeof la);
    if (family == AF_INET6) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&la;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)listen_port);
        s6->sin6_addr = in6addr_loopback;
        la_len = sizeof *s6;
        setsockopt(l, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof on);
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&la;
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)listen_port);
        s4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        la_len = sizeof *s4;
    }
    if (bind(l, (struct sockaddr *)&la, la_len) < 0) die("bind to loopback:LISTEN_PORT");
    if (listen(l, 4096) < 0) die("listen");

    one(l, &target, 1);
    if (closed_arg) one_closed(&closed, 1);
    if (!from_stdin) {
        int64_t *iter = malloc(sizeof(int64_t) * (size_t)(count + 1));
        int64_t *conn = malloc(sizeof(int64_t) * (size_t)count);
        if (!iter || !conn) die("malloc");
        batch(l, &target, NULL, count, warmup, iter, conn);
        return 0;
    }

    /* Persistent mode: the caller interleaves several clients by asking each for one batch
     * at a time ("COUNT WARMUP\n", or "COUNT WARMUP closed\n"); EOF ends it. */
    printf("{\"ready\":true}\n");
    fflush(stdout);
    int64_t *iter = NULL, *conn = NULL;
    long cap = 0;
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        char *end;
        count = strtol(line, &end, 10);
        warmup = strtol(end, &end, 10);
        while (*end == ' ') end++;
        int closed_mode = !strncmp(end, "closed", 6);
        if (closed_mode && !closed_arg) {
            fprintf(stderr, "connect_bench: a closed-port batch needs --closed-target\n");
            return 2;
        }
        if (count < 1 || count > MAX_COUNT || warmup < 0 || warmup > MAX_COUNT) {
            fprintf(stderr, "connect_bench: bad request %s", line);
            return 2;
        }
        if (count > cap) {
            free(iter);
            free(conn);
            iter = malloc(sizeof(int64_t) * (size_t)(count + 1));
            conn = malloc(sizeof(int64_t) * (size_t)count);
            if (!iter || !conn) die("malloc");
            cap = count;
        }
        batch(l, &target, closed_mode ? &closed : NULL, count, warmup, iter, conn);
    }
    return 0;
}
