/*
 * A broker client in plain C: what docs/protocol.md ("The broker wire") asks of one.
 *
 *   ipc_client SOCKET_PATH
 *
 * Connects, says hello, serves the name "cserv", subscribes to "c.#", publishes
 * {"from":"c"} on "c.hello", calls the name "pyserv" with [1,2], and answers one
 * request to "cserv" with {"echo":PAYLOAD}. It prints one line per event on stdout
 * ("welcome ...", "ready", "message TOPIC PAYLOAD", "response PAYLOAD",
 * "served PAYLOAD") and exits 0 once it has seen its message, its response and
 * served one request; any protocol surprise exits 1 with a line on stderr.
 *
 * Headers are JSON; the broker writes them compactly, so this small client finds
 * the fields it needs with strstr instead of a JSON library (a real client would
 * use one). All lengths are big-endian u32.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_HEADER 65536

static void die(const char *what) {
    fprintf(stderr, "ipc_client: %s\n", what);
    exit(1);
}

static void write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) die("write failed");
        p += w;
        n -= (size_t)w;
    }
}

static int read_all(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r == 0) return 0;
        if (r < 0) die("read failed");
        p += r;
        n -= (size_t)r;
    }
    return 1;
}

/* One frame: u32 L (= 4 + H + payload), u32 H, header, payload. */
static void send_frame(int fd, const char *header, const char *payload) {
    uint32_t h = (uint32_t)strlen(header), p = (uint32_t)strlen(payload);
    uint32_t lengths[2] = {htonl(4 + h + p), htonl(h)};
    write_all(fd, lengths, sizeof lengths);
    write_all(fd, header, h);
    write_all(fd, payload, p);
}

struct frame {
    char header[MAX_HEADER + 1];
    char *payload; /* NUL-terminated copy, malloc'd */
};

static void recv_frame(int fd, struct frame *f) {
    uint32_t lengths[2];
    if (!read_all(fd, lengths, sizeof lengths)) die("the broker closed the connection");
    uint32_t total = ntohl(lengths[0]), h = ntohl(lengths[1]);
    if (h == 0 || h > MAX_HEADER || total < 4 + h) die("bad frame lengths");
    if (!read_all(fd, f->header, h)) die("truncated header");
    f->header[h] = '\0';
    uint32_t p = total - 4 - h;
    free(f->payload);
    f->payload = malloc(p + 1);
    if (!f->payload) die("out of memory");
    if (p && !read_all(fd, f->payload, p)) die("truncated payload");
    f->payload[p] = '\0';
}

/* The string value of "key" in a compact JSON header, copied into out. */
static int field_str(const char *header, const char *key, char *out, size_t size) {
    char pattern[64];
    snprintf(pattern, sizeof pattern, "\"%s\":\"", key);
    const char *s = strstr(header, pattern);
    if (!s) return 0;
    s += strlen(pattern);
    const char *e = strchr(s, '"');
    if (!e || (size_t)(e - s) >= size) return 0;
    memcpy(out, s, (size_t)(e - s));
    out[e - s] = '\0';
    return 1;
}

static long field_int(const char *header, const char *key) {
    char pattern[64];
    snprintf(pattern, sizeof pattern, "\"%s\":", key);
    const char *s = strstr(header, pattern);
    return s ? strtol(s + strlen(pattern), NULL, 10) : -1;
}

static void expect_op(struct frame *f, const char *op) {
    char got[32];
    if (!field_str(f->header, "op", got, sizeof got) || strcmp(got, op) != 0) {
        fprintf(stderr, "ipc_client: expected %s, got %s\n", op, f->header);
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc != 2) die("usage: ipc_client SOCKET_PATH");
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) die("socket failed");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(argv[1]) >= sizeof addr.sun_path) die("socket path too long");
    strcpy(addr.sun_path, argv[1]);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect failed");

    struct frame f = {.payload = NULL};
    send_frame(fd, "{\"op\":\"hello\",\"version\":1,\"name\":\"c-client\"}", "");
    recv_frame(fd, &f);
    expect_op(&f, "welcome");
    printf("welcome uid %ld broker %ld\n", field_int(f.header, "uid"),
           field_int(f.header, "broker_pid"));

    send_frame(fd, "{\"op\":\"serve\",\"id\":1,\"name\":\"cserv\"}", "");
    recv_frame(fd, &f);
    expect_op(&f, "ok");
    send_frame(fd, "{\"op\":\"subscribe\",\"id\":2,\"pattern\":\"c.#\"}", "");
    recv_frame(fd, &f);
    expect_op(&f, "ok");
    printf("ready\n");
    fflush(stdout);

    send_frame(fd, "{\"op\":\"publish\",\"topic\":\"c.hello\",\"codec\":\"json\"}",
               "{\"from\":\"c\"}");
    send_frame(fd, "{\"op\":\"request\",\"id\":7,\"to\":\"pyserv\",\"codec\":\"json\",\"timeout\":30}",
               "[1,2]");

    int got_message = 0, got_response = 0, served = 0;
    while (!(got_message && got_response && served)) {
        char op[32], topic[256];
        recv_frame(fd, &f);
        if (!field_str(f.header, "op", op, sizeof op)) die("a header without op");
        if (strcmp(op, "message") == 0) {
            field_str(f.header, "topic", topic, sizeof topic);
            printf("message %s %s\n", topic, f.payload);
            got_message = 1;
        } else if (strcmp(op, "response") == 0 && field_int(f.header, "id") == 7) {
            printf("response %s\n", f.payload);
            got_response = 1;
        } else if (strcmp(op, "request") == 0) {
            char header[128], payload[4096];
            snprintf(header, sizeof header, "{\"op\":\"response\",\"id\":%ld,\"codec\":\"json\"}",
                     field_int(f.header, "id"));
            snprintf(payload, sizeof payload, "{\"echo\":%s}", f.payload);
            send_frame(fd, header, payload);
            printf("served %s\n", f.payload);
            served = 1;
        } else if (strcmp(op, "error") == 0) {
            fprintf(stderr, "ipc_client: error %s\n", f.header);
            return 1;
        }
        fflush(stdout);
    }
    free(f.payload);
    close(fd);
    return 0;
}
