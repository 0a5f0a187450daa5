/* zload: the bench's compiled load generator (scripts/bench.py builds and drives it).
 *
 * One DEALER socket keeps IN_FLIGHT HOOT01 requests outstanding (closed loop) until
 * REQUESTS replies came back or SECONDS passed, or sends at RATE requests/s whatever
 * comes back (open loop; IN_FLIGHT caps what may be outstanding).  Each request is the
 * template's frames with frame 3, the request id, made unique; a reply is matched by
 * its id.  Every reply is written to OUT as (double latency s, uint32 size, body) for
 * bench.py to decode and count: this program only moves bytes, so the client costs the
 * daemon's CPU far less than a Python client does (the issue asks for a client that is
 * not the bottleneck).
 *
 * Protocol with bench.py: after WARMUP sequential requests it prints "ready", waits for
 * a line on stdin, runs, then prints "done STARTED ENDED" (CLOCK_MONOTONIC seconds, the
 * clock of Python's time.perf_counter) and exits 0; on failure it prints the reason on
 * stderr and exits 1.
 *
 * usage: zload ENDPOINT TEMPLATE OUT IN_FLIGHT REQUESTS SECONDS RATE WARMUP
 *   TEMPLATE: uint32 frame count, then per frame uint32 size and bytes (little endian)
 *   REQUESTS 0: no count; SECONDS 0: no time limit; RATE 0: closed loop
 *
 * libzmq's API is declared here, not included: pyzmq ships the library without its
 * header, and bench.py links against the very library pyzmq loads.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    unsigned char _[64];
} __attribute__((aligned(8))) zmq_msg_t;
typedef struct {
    void *socket;
    int fd;
    short events;
    short revents;
} zmq_pollitem_t;
void *zmq_ctx_new(void);
int zmq_ctx_term(void *);
void *zmq_socket(void *, int);
int zmq_close(void *);
int zmq_setsockopt(void *, int, const void *, size_t);
int zmq_connect(void *, const char *);
int zmq_send(void *, const void *, size_t, int);
int zmq_msg_init(zmq_msg_t *);
int zmq_msg_recv(zmq_msg_t *, void *, int);
void *zmq_msg_data(zmq_msg_t *);
size_t zmq_msg_size(const zmq_msg_t *);
int zmq_msg_more(const zmq_msg_t *);
int zmq_msg_close(zmq_msg_t *);
int zmq_poll(zmq_pollitem_t *, int, long);
int zmq_errno(void);
const char *zmq_strerror(int);

enum { ZMQ_DEALER = 5, ZMQ_LINGER = 17, ZMQ_SNDHWM = 23, ZMQ_RCVHWM = 24 };
enum { ZMQ_DONTWAIT = 1, ZMQ_SNDMORE = 2, ZMQ_POLLIN = 1, ZMQ_EAGAIN = 11 };

#define MAX_FRAMES 16
#define ID_FRAME 3   /* HOOT01: the request id */
#define BODY_FRAME 6 /* HOOT01: the body */
#define ID_SIZE 16   /* 8 bytes of this process's prefix, 8 of counter */
#define REPLY_TIMEOUT_MS 30000

static void *sock;
static unsigned char *frames[MAX_FRAMES];
static uint32_t sizes[MAX_FRAMES];
static uint32_t nframes;
static unsigned char prefix[8];
static uint64_t counter;
static double *sent_at; /* by counter */
static uint64_t sent_cap;
static FILE *out;

static void die(const char *what) {
    fprintf(stderr, "zload: %s\n", what);
    exit(1);
}

static void die_zmq(const char *what) {
    fprintf(stderr, "zload: %s: %s\n", what, zmq_strerror(zmq_errno()));
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void read_template(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open the template");
    if (fread(&nframes, 4, 1, f) != 1 || nframes <= BODY_FRAME || nframes > MAX_FRAMES) die("bad template");
    for (uint32_t i = 0; i < nframes; i++) {
        if (fread(&sizes[i], 4, 1, f) != 1) die("bad template");
        frames[i] = malloc(sizes[i] ? sizes[i] : 1);
        if (!frames[i] || (sizes[i] && fread(frames[i], 1, sizes[i], f) != sizes[i])) die("bad template");
    }
    if (sizes[ID_FRAME] != ID_SIZE) die("the template's request id is not 16 bytes");
    fclose(f);
}

static void send_one(void) {
    if (counter == sent_cap) {
        sent_cap = sent_cap ? 2 * sent_cap : 65536;
        sent_at = realloc(sent_at, sent_cap * sizeof(double));
        if (!sent_at) die("out of memory");
    }
    unsigned char *id = frames[ID_FRAME];
    memcpy(id, prefix, 8);
    for (int i = 0; i < 8; i++) id[8 + i] = (unsigned char)(counter >> (56 - 8 * i));
    sent_at[counter++] = now();
    for (uint32_t i = 0; i < nframes; i++) {
        if (zmq_send(sock, frames[i], sizes[i], i + 1 < nframes ? ZMQ_SNDMORE : 0) < 0) die_zmq("send");
    }
}

/* One reply, if one is there (flags ZMQ_DONTWAIT) or within the reply timeout: 1 when
 * received (and written to OUT unless record is 0), 0 when none was there. */
static int receive_one(int flags, int record) {
    if (!(flags & ZMQ_DONTWAIT)) {
        zmq_pollitem_t item = {sock, 0, ZMQ_POLLIN, 0};
        int ready = zmq_poll(&item, 1, REPLY_TIMEOUT_MS);
        if (ready < 0) die_zmq("poll");
        if (ready == 0) die("no reply within 30 s");
    }
    zmq_msg_t part;
    uint64_t number = UINT64_MAX;
    int more = 1;
    for (int index = 0; more; index++) {
        zmq_msg_init(&part);
        if (zmq_msg_recv(&part, sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&part);
            if (index == 0 && zmq_errno() == ZMQ_EAGAIN) return 0;
            die_zmq("receive");
        }
        const unsigned char *data = zmq_msg_data(&part);
        size_t size = zmq_msg_size(&part);
        if (index == ID_FRAME && size == ID_SIZE && memcmp(data, prefix, 8) == 0) {
            number = 0;
            for (int i = 8; i < 16; i++) number = (number << 8) | data[i];
        }
        if (index == BODY_FRAME && record) {
            if (number >= counter) die("a reply to no request of ours");
            double latency = now() - sent_at[number];
            uint32_t body_size = (uint32_t)size;
            fwrite(&latency, sizeof latency, 1, out);
            fwrite(&body_size, 4, 1, out);
            fwrite(data, 1, size, out);
        }
        more = zmq_msg_more(&part);
        zmq_msg_close(&part);
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 9) die("usage: zload ENDPOINT TEMPLATE OUT IN_FLIGHT REQUESTS SECONDS RATE WARMUP");
    const char *endpoint = argv[1];
    read_template(argv[2]);
    out = fopen(argv[3], "wb");
    if (!out) die("cannot open the output");
    long in_flight = atol(argv[4]);
    uint64_t requests = strtoull(argv[5], NULL, 10);
    double seconds = atof(argv[6]);
    double rate = atof(argv[7]);
    long warmup = atol(argv[8]);
    if (in_flight < 1) die("IN_FLIGHT must be at least 1");

    FILE *random = fopen("/dev/urandom", "rb");
    if (!random || fread(prefix, 1, 8, random) != 8) die("cannot read /dev/urandom");
    fclose(random);

    void *ctx = zmq_ctx_new();
    sock = zmq_socket(ctx, ZMQ_DEALER);
    if (!sock) die_zmq("socket");
    int zero = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(sock, ZMQ_SNDHWM, &zero, sizeof zero); /* the in-flight cap bounds the queue */
    zmq_setsockopt(sock, ZMQ_RCVHWM, &zero, sizeof zero);
    if (zmq_connect(sock, endpoint) < 0) die_zmq("connect");

    for (long i = 0; i < warmup; i++) { /* connection set up, the server's paths warm */
        send_one();
        receive_one(0, 0);
    }
    printf("ready\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) die("no go");

    uint64_t first = counter, answered = 0, outstanding = 0;
    double started = now(), t = started;
    double deadline = seconds > 0 ? started + seconds : 1e300;
    if (rate <= 0) { /* closed loop */
        uint64_t limit = requests ? requests : UINT64_MAX;
        while (answered < limit && t < deadline) {
            while (outstanding < (uint64_t)in_flight && counter - first < limit) {
                send_one();
                outstanding++;
            }
            int got = receive_one(0, 1); /* wait for one, then take what else is there */
            while (got) {
                answered++;
                outstanding--;
                got = receive_one(ZMQ_DONTWAIT, 1);
            }
            t = now();
        }
    } else { /* open loop */
        double interval = 1.0 / rate, due = started;
        while (t < deadline || (outstanding && t < deadline + 5)) {
            while (t < deadline && due <= t && outstanding < (uint64_t)in_flight) {
                send_one();
                outstanding++;
                due += interval;
            }
            /* at the in-flight cap nothing can be sent before a reply comes: block */
            int can_send = t < deadline && outstanding < (uint64_t)in_flight;
            double until = due < deadline ? due : deadline;
            long wait_ms = can_send ? (long)((until - t) * 1000) : 100;
            zmq_pollitem_t item = {sock, 0, ZMQ_POLLIN, 0};
            int ready = zmq_poll(&item, 1, wait_ms > 0 ? wait_ms : 0);
            if (ready < 0) die_zmq("poll");
            while (ready && receive_one(ZMQ_DONTWAIT, 1)) outstanding--;
            t = now();
        }
        if (t > deadline) t = deadline;
    }
    if (fclose(out) != 0) die("cannot write the output");
    printf("done %.9f %.9f\n", started, t);
    fflush(stdout);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return 0;
}
