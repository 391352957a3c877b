/*
 * ikos-fdkeeper: the descriptor keeper of ikos.platform._fdstore, in C.
 *
 * It holds duplicates of ikosd's descriptors (log pipes, listening sockets,
 * status pipes, counters) so that they outlive a kill -9 of ikosd; the next
 * ikosd on the same root takes them back. The Python keeper (_fdkeeper.py)
 * costs a whole interpreter (~6 MiB of private memory for as long as it
 * lives); this program does the same job in a few pages.
 *
 * Usage: ikos-fdkeeper SOCKET. It binds SOCKET (a SOCK_SEQPACKET Unix
 * socket, mode 0600), prints "ready\n" on stdout, then serves one connection
 * at a time, in the order they came, exactly as the Python keeper does: the
 * puts a killed ikosd had queued are all handled before the next ikosd's
 * "list" is read, because that next ikosd's connection waits behind them.
 *
 * The protocol is the Python keeper's, byte for byte: each message is one
 * SEQPACKET datagram holding a pickled dict (protocol 4, what pickle.dumps
 * writes), with descriptors passed as SCM_RIGHTS:
 *   {"op": "put", "name": N, "key": K} + 1 fd  store fd under (N, K), replacing
 *   {"op": "drop", "name": N, "keys": [K...] or None}   close those
 *   {"op": "list"}    answered by {"op": "entry", "name": N, "key": K} + fd
 *                     for each entry (in the order they were put), then {"op": "end"}
 *   {"op": "quit"}    answered by {"op": "bye"}; the keeper closes all and exits
 * So this program reads the small subset of pickle that pickle.dumps uses for
 * such dicts (strings, None, lists of strings, memo references) and writes
 * the exact bytes pickle.dumps would. Anything else in a message is garbage:
 * its descriptors are closed and the connection is dropped (the Python
 * keeper drops it on an unpickling error too); the keeper itself never stops
 * for what a peer sends.
 *
 * Who may connect: the socket file is 0600 (created under umask 077), and a
 * peer whose uid (SO_PEERCRED) is neither ours nor root is hung up on before
 * anything is read. Such a peer could otherwise only be root or ikosd's own
 * user, who can kill ikosd anyway.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* The Python keeper's bounds (_fdkeeper.py). */
#define MAX_MESSAGE 65536
#define MAX_FDS_PER_MESSAGE 64
#define MAX_ENTRIES 100000
/* Bounds of the pickle reader: ikosd's messages need a handful of each. */
#define MAX_STACK 64
#define MAX_MEMO 256
#define MAX_ITEMS 1024 /* strings in all the lists of one message */
#define MAX_LISTS 16
#define MAX_PAIRS 16 /* items of the one dict */
/* A peer that asked for "list" but does not read cannot wedge the keeper for ever. */
#define SEND_TIMEOUT_S 30

/* -- the store: (name, key) -> fd, in the order they were put ---------------------- */

struct entry {
    char *name, *key; /* one allocation: name bytes then key bytes */
    uint32_t nlen, klen;
    int fd;
};

static struct entry *entries;
static size_t count, capacity;

static int same(const char *a, uint32_t alen, const char *b, uint32_t blen)
{
    return alen == blen && memcmp(a, b, alen) == 0;
}

static void remove_at(size_t i)
{
    close(entries[i].fd);
    free(entries[i].name);
    memmove(entries + i, entries + i + 1, (count - i - 1) * sizeof *entries);
    count--;
}

/* Store fd under (name, key); the fd is ours either way (closed when it cannot be kept). */
static void put(const char *name, uint32_t nlen, const char *key, uint32_t klen, int fd)
{
    for (size_t i = 0; i < count; i++) {
        if (same(entries[i].name, entries[i].nlen, name, nlen) &&
            same(entries[i].key, entries[i].klen, key, klen)) {
            remove_at(i); /* replaced: the new one goes last, as in a Python dict */
            break;
        }
    }
    if (count >= MAX_ENTRIES) {
        close(fd);
        return;
    }
    if (count == capacity) {
        size_t more = capacity ? capacity * 2 : 64;
        struct entry *grown = realloc(entries, more * sizeof *entries);
        if (grown == NULL) {
            close(fd);
            return;
        }
        entries = grown, capacity = more;
    }
    char *copy = malloc((size_t)nlen + klen + 1);
    if (copy == NULL) {
        close(fd);
        return;
    }
    memcpy(copy, name, nlen);
    memcpy(copy + nlen, key, klen);
    entries[count++] = (struct entry){copy, copy + nlen, nlen, klen, fd};
}

/* -- reading a pickled message ----------------------------------------------------- */

enum kind { NONE, STR, LIST, DICT, MARK, OTHER };

struct value {
    enum kind kind;
    const char *s; /* STR: bytes in the message buffer */
    uint32_t len;  /* STR: their length; LIST: its index in lists */
};

struct list {
    uint32_t first, n; /* a run of items[]; appends only extend the newest list */
};

struct message {
    struct value stack[MAX_STACK], memo[MAX_MEMO];
    struct value items[MAX_ITEMS];
    struct list lists[MAX_LISTS];
    struct value keys[MAX_PAIRS], values[MAX_PAIRS];
    size_t depth, nmemo, nitems, nlists, npairs;
    int have_dict;
};

static struct message msg;

static int push(struct value v)
{
    if (msg.depth == MAX_STACK)
        return -1;
    msg.stack[msg.depth++] = v;
    return 0;
}

static int memoize(size_t at, struct value v)
{
    if (at >= MAX_MEMO)
        return -1;
    while (msg.nmemo < at) /* a gap (BINPUT may skip): no stale value of an earlier message */
        msg.memo[msg.nmemo++] = (struct value){OTHER, NULL, 0};
    msg.memo[at] = v;
    if (at >= msg.nmemo)
        msg.nmemo = at + 1;
    return 0;
}

static size_t find_mark(void)
{
    for (size_t i = msg.depth; i > 0; i--)
        if (msg.stack[i - 1].kind == MARK)
            return i - 1;
    return SIZE_MAX;
}

static uint64_t le(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/*
 * Whether s[0..n) is UTF-8 as pickle decodes it ("surrogatepass": the
 * encoded surrogates U+D800..U+DFFF are allowed). ikosd could not read
 * back a name that is not: it would fail to unpickle the "list" reply.
 */
static int utf8_ok(const unsigned char *s, uint64_t n)
{
    uint64_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        int more;
        unsigned char lo = 0x80, hi = 0xbf; /* the range of the byte after the first */
        if (c < 0x80)
            more = 0;
        else if (c >= 0xc2 && c <= 0xdf)
            more = 1;
        else if (c >= 0xe0 && c <= 0xef)
            more = 2, lo = c == 0xe0 ? 0xa0 : 0x80;
        else if (c >= 0xf0 && c <= 0xf4)
            more = 3, lo = c == 0xf0 ? 0x90 : 0x80, hi = c == 0xf4 ? 0x8f : 0xbf;
        else
            return 0;
        if ((uint64_t)more > n - i - 1)
            return 0;
        for (int k = 1; k <= more; k++) {
            unsigned char b = s[i + (uint64_t)k];
            if (k == 1 ? b < lo || b > hi : (b & 0xc0) != 0x80)
                return 0;
        }
        i += (uint64_t)more + 1;
    }
    return 1;
}

/* Append stack[from..depth) (strings only) to the list below them; -1 if not possible. */
static int append_items(size_t from, size_t target)
{
    if (msg.stack[target].kind != LIST)
        return -1;
    struct list *l = &msg.lists[msg.stack[target].len];
    /* items of a list are contiguous: only the newest list may grow */
    if (msg.stack[target].len != msg.nlists - 1 || l->first + l->n != msg.nitems)
        return -1;
    for (size_t i = from; i < msg.depth; i++) {
        if (msg.stack[i].kind != STR || msg.nitems == MAX_ITEMS)
            return -1;
        msg.items[msg.nitems++] = msg.stack[i];
        l->n++;
    }
    return 0;
}

/* Set stack[from..depth) (key, value pairs) in the dict below them. */
static int set_items(size_t from, size_t target)
{
    if (msg.stack[target].kind != DICT || (msg.depth - from) % 2)
        return -1;
    for (size_t i = from; i < msg.depth; i += 2) {
        struct value k = msg.stack[i], v = msg.stack[i + 1];
        if (k.kind != STR || v.kind == MARK || v.kind == DICT)
            return -1;
        size_t j = 0;
        while (j < msg.npairs && !(msg.keys[j].kind == STR && same(msg.keys[j].s, msg.keys[j].len, k.s, k.len)))
            j++;
        if (j == MAX_PAIRS)
            return -1;
        if (j == msg.npairs)
            msg.npairs++;
        msg.keys[j] = k, msg.values[j] = v; /* a repeated key: the last wins, as in Python */
    }
    return 0;
}

/*
 * Run the pickle in buf[0..n): 0 with the message's dict in msg.keys/values,
 * 1 when it is a valid pickle of something else than such a dict (ignored, as
 * the Python keeper ignores a non-dict), -1 when it is not one we can read.
 */
static int parse(const unsigned char *buf, size_t n)
{
    msg.depth = msg.nmemo = msg.nitems = msg.nlists = msg.npairs = 0;
    msg.have_dict = 0;
    size_t i = 0;
    while (i < n) {
        unsigned char op = buf[i++];
        size_t left = n - i;
        uint64_t len;
        size_t mark;
        switch (op) {
        case 0x80: /* PROTO */
            if (left < 1 || buf[i] < 2 || buf[i] > 5)
                return -1;
            i++;
            break;
        case 0x95: /* FRAME: a length we check against what is left */
            if (left < 8 || le(buf + i, 8) > left - 8)
                return -1;
            i += 8;
            break;
        case 0x8c: /* SHORT_BINUNICODE */
        case 'X':  /* BINUNICODE */
        case 0x8d: /* BINUNICODE8 */
        {
            int width = op == 0x8c ? 1 : op == 'X' ? 4 : 8;
            if (left < (size_t)width)
                return -1;
            len = le(buf + i, width);
            i += width;
            if (len > n - i || !utf8_ok(buf + i, len))
                return -1;
            if (push((struct value){STR, (const char *)buf + i, (uint32_t)len}) < 0)
                return -1;
            i += len;
            break;
        }
        case 'N': /* NONE */
            if (push((struct value){NONE, NULL, 0}) < 0)
                return -1;
            break;
        case 0x88: /* NEWTRUE, NEWFALSE, small ints: valid values we have no use for */
        case 0x89:
            if (push((struct value){OTHER, NULL, 0}) < 0)
                return -1;
            break;
        case 'K': /* BININT1 */
            if (left < 1 || push((struct value){OTHER, NULL, 0}) < 0)
                return -1;
            i += 1;
            break;
        case ']': /* EMPTY_LIST */
            if (msg.nlists == MAX_LISTS)
                return -1;
            msg.lists[msg.nlists] = (struct list){(uint32_t)msg.nitems, 0};
            if (push((struct value){LIST, NULL, (uint32_t)msg.nlists++}) < 0)
                return -1;
            break;
        case '}': /* EMPTY_DICT: one per message, ours */
            if (msg.have_dict)
                return -1;
            msg.have_dict = 1;
            if (push((struct value){DICT, NULL, 0}) < 0)
                return -1;
            break;
        case '(': /* MARK */
            if (push((struct value){MARK, NULL, 0}) < 0)
                return -1;
            break;
        case 0x94: /* MEMOIZE */
            if (msg.depth == 0 || memoize(msg.nmemo, msg.stack[msg.depth - 1]) < 0)
                return -1;
            break;
        case 'q': /* BINPUT */
        case 'r': /* LONG_BINPUT */
        case 'h': /* BINGET */
        case 'j': /* LONG_BINGET */
        {
            int width = op == 'q' || op == 'h' ? 1 : 4;
            if (left < (size_t)width)
                return -1;
            len = le(buf + i, width);
            i += width;
            if (op == 'q' || op == 'r') {
                if (msg.depth == 0 || len >= MAX_MEMO || memoize((size_t)len, msg.stack[msg.depth - 1]) < 0)
                    return -1;
            } else {
                if (len >= msg.nmemo || msg.memo[len].kind == MARK || push(msg.memo[len]) < 0)
                    return -1;
            }
            break;
        }
        case 'a': /* APPEND */
            if (msg.depth < 2 || append_items(msg.depth - 1, msg.depth - 2) < 0)
                return -1;
            msg.depth--;
            break;
        case 's': /* SETITEM */
            if (msg.depth < 3 || set_items(msg.depth - 2, msg.depth - 3) < 0)
                return -1;
            msg.depth -= 2;
            break;
        case 'e': /* APPENDS */
        case 'u': /* SETITEMS */
            mark = find_mark();
            if (mark == SIZE_MAX || mark == 0)
                return -1;
            if ((op == 'e' ? append_items(mark + 1, mark - 1) : set_items(mark + 1, mark - 1)) < 0)
                return -1;
            msg.depth = mark;
            break;
        case '.': /* STOP: exactly one value left, and nothing after it */
            if (msg.depth != 1 || i != n)
                return -1;
            return msg.stack[0].kind == DICT ? 0 : 1;
        default:
            return -1;
        }
    }
    return -1; /* no STOP: a truncated message */
}

/* The value of key `name` in the message's dict, or NULL when absent. */
static const struct value *get(const char *name)
{
    for (size_t j = 0; j < msg.npairs; j++)
        if (same(msg.keys[j].s, msg.keys[j].len, name, (uint32_t)strlen(name)))
            return &msg.values[j];
    return NULL;
}

static int is(const struct value *v, const char *text)
{
    return v != NULL && v->kind == STR && same(v->s, v->len, text, (uint32_t)strlen(text));
}

/* -- writing a pickled message ----------------------------------------------------- */

static unsigned char out[MAX_MESSAGE + 64];

/* Append a string as pickle.dumps writes it (protocol 4): opcode, length, bytes, MEMOIZE. */
static size_t put_str(size_t at, const char *s, uint32_t len)
{
    if (len < 256) {
        out[at++] = 0x8c;
        out[at++] = (unsigned char)len;
    } else {
        out[at++] = 'X';
        for (int b = 0; b < 4; b++)
            out[at++] = (unsigned char)(len >> (8 * b));
    }
    memcpy(out + at, s, len);
    at += len;
    out[at++] = 0x94;
    return at;
}

/* Send {"op": op[, "name": name, "key": key]} with fd (or none: -1); -1 on failure. */
static int send_message(int conn, const char *op, const struct entry *e, int fd)
{
    /* the header: PROTO 4, FRAME <8-byte length>, EMPTY_DICT, MEMOIZE */
    size_t at = 11;
    out[at++] = '}';
    out[at++] = 0x94;
    if (e != NULL)
        out[at++] = '('; /* several items: MARK ... SETITEMS */
    at = put_str(at, "op", 2);
    at = put_str(at, op, (uint32_t)strlen(op));
    if (e != NULL) {
        at = put_str(at, "name", 4);
        at = put_str(at, e->name, e->nlen);
        at = put_str(at, "key", 3);
        at = put_str(at, e->key, e->klen);
    }
    out[at++] = e != NULL ? 'u' : 's';
    out[at++] = '.';
    uint64_t frame = at - 11;
    out[0] = 0x80, out[1] = 4, out[2] = 0x95;
    for (int b = 0; b < 8; b++)
        out[3 + b] = (unsigned char)(frame >> (8 * b));

    struct iovec iov = {out, at};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        memset(&control, 0, sizeof control);
        mh.msg_control = control.buf;
        mh.msg_controllen = sizeof control.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    ssize_t sent;
    do
        sent = sendmsg(conn, &mh, MSG_NOSIGNAL); /* a gone peer is EPIPE, not SIGPIPE */
    while (sent < 0 && errno == EINTR);
    return sent == (ssize_t)at ? 0 : -1;
}

/* -- serving ----------------------------------------------------------------------- */

static unsigned char in[MAX_MESSAGE];

static void close_all(const int *fds, size_t n)
{
    for (size_t i = 0; i < n; i++)
        close(fds[i]);
}

/*
 * One message: 1 to go on with this connection, 0 when it ended or sent
 * garbage (hang up), 2 when told to quit. Every descriptor received is
 * either stored or closed before this returns.
 */
static int handle(int conn)
{
    int fds[MAX_FDS_PER_MESSAGE];
    size_t nfds = 0;
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(MAX_FDS_PER_MESSAGE * sizeof(int))];
    } control;
    struct iovec iov = {in, sizeof in};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1,
                        .msg_control = control.buf, .msg_controllen = sizeof control.buf};
    ssize_t n;
    do
        n = recvmsg(conn, &mh, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return 0;
    /* collect every descriptor that came, whatever else is wrong with the message */
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c != NULL; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t j = 0; j < k; j++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + j * sizeof(int), sizeof fd);
            if (nfds < MAX_FDS_PER_MESSAGE)
                fds[nfds++] = fd;
            else
                close(fd); /* cannot happen (the buffer holds 64), but never leak */
        }
    }
    /* n == 0: the peer closed (a message of 0 bytes is no pickle either) */
    if (n == 0 || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
        close_all(fds, nfds);
        return 0;
    }
    int parsed = parse(in, (size_t)n);
    if (parsed != 0) {
        close_all(fds, nfds);
        return parsed > 0 ? 1 : 0;
    }
    const struct value *op = get("op"), *name = get("name");
    if (is(op, "put") && nfds == 1 && count < MAX_ENTRIES) {
        const struct value *key = get("key");
        /* the entry goes back in one message of at most MAX_MESSAGE bytes */
        if (name == NULL || name->kind != STR || key == NULL || key->kind != STR ||
            (uint64_t)name->len + key->len > MAX_MESSAGE - 128) {
            close(fds[0]);
            return 0;
        }
        put(name->s, name->len, key->s, key->len, fds[0]);
        return 1;
    }
    close_all(fds, nfds);
    if (is(op, "drop")) {
        const struct value *keys = get("keys");
        if (name == NULL || name->kind != STR || (keys != NULL && keys->kind != NONE && keys->kind != LIST))
            return 0;
        const struct list *l = keys != NULL && keys->kind == LIST ? &msg.lists[keys->len] : NULL;
        for (size_t i = count; i > 0; i--) {
            struct entry *e = &entries[i - 1];
            if (!same(e->name, e->nlen, name->s, name->len))
                continue;
            int hit = l == NULL;
            for (uint32_t j = 0; l != NULL && j < l->n && !hit; j++)
                hit = same(e->key, e->klen, msg.items[l->first + j].s, msg.items[l->first + j].len);
            if (hit)
                remove_at(i - 1);
        }
    } else if (is(op, "list")) {
        for (size_t i = 0; i < count; i++)
            if (send_message(conn, "entry", &entries[i], entries[i].fd) < 0)
                return 0;
        if (send_message(conn, "end", NULL, -1) < 0)
            return 0;
    } else if (is(op, "quit")) {
        send_message(conn, "bye", NULL, -1); /* quitting either way */
        return 2;
    }
    return 1;
}

/* Serve one connection until it ends; 1 when told to quit. */
static int session(int conn)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 || len != sizeof cred ||
        (cred.uid != 0 && cred.uid != getuid()))
        return 0;
    struct timeval timeout = {SEND_TIMEOUT_S, 0};
    if (setsockopt(conn, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout) < 0)
        return 0;
    int r;
    while ((r = handle(conn)) == 1)
        ;
    return r == 2;
}

/*
 * Where to reach path through sun_path: path itself when it fits, else
 * /proc/self/fd/N/NAME with N an O_PATH descriptor of its directory (test
 * roots are deep), as ikos.platform._unix.short_path does on ikosd's side.
 * Returns that descriptor (to close after use), -1 when none was needed,
 * -2 on failure.
 */
static int reach(const char *path, struct sockaddr_un *addr)
{
    memset(addr, 0, sizeof *addr);
    addr->sun_family = AF_UNIX;
    if (strlen(path) < sizeof addr->sun_path) {
        strcpy(addr->sun_path, path);
        return -1;
    }
    const char *slash = strrchr(path, '/');
    char dir[4096];
    size_t dlen = slash != NULL ? (size_t)(slash - path) : 0;
    if (slash == NULL || dlen >= sizeof dir)
        return -2;
    memcpy(dir, path, dlen);
    dir[dlen] = '\0';
    int dirfd = open(dlen ? dir : "/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0)
        return -2;
    int want = snprintf(addr->sun_path, sizeof addr->sun_path, "/proc/self/fd/%d/%s", dirfd, slash + 1);
    if (want < 0 || (size_t)want >= sizeof addr->sun_path) {
        close(dirfd);
        return -2;
    }
    return dirfd;
}

/* The listening socket at path, mode 0600; -1 on failure. */
static int listen_at(const char *path)
{
    struct sockaddr_un addr;
    int dirfd = reach(path, &addr);
    if (dirfd == -2)
        return -1;
    /* a stale socket of a dead keeper goes; anything else at that path stays */
    struct stat st;
    if (stat(addr.sun_path, &st) == 0 && S_ISSOCK(st.st_mode))
        unlink(addr.sun_path);
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    int ok = sock >= 0;
    mode_t old = umask(077); /* 0600 from the start: no window before the chmod */
    ok = ok && bind(sock, (struct sockaddr *)&addr, sizeof addr) == 0;
    umask(old);
    ok = ok && chmod(addr.sun_path, 0600) == 0 && listen(sock, 4) == 0;
    if (dirfd >= 0)
        close(dirfd);
    if (!ok && sock >= 0)
        close(sock);
    return ok ? sock : -1;
}

static void unlink_at(const char *path)
{
    struct sockaddr_un addr;
    int dirfd = reach(path, &addr);
    if (dirfd != -2)
        unlink(addr.sun_path);
    if (dirfd >= 0)
        close(dirfd);
}

static int write_all(int fd, const char *s)
{
    size_t len = strlen(s);
    while (len > 0) {
        ssize_t n = write(fd, s, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        s += n, len -= (size_t)n;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        write_all(2, "usage: ikos-fdkeeper SOCKET\n");
        return 2;
    }
    /* ikosd's Ctrl-C and hangup are not ours: only quit or SIGTERM/SIGKILL end us */
    signal(SIGINT, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    /* one descriptor per entry: up to the hard limit, as the IPC broker does */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl); /* best effort: the soft limit is enough for most */
    }
    int listener = listen_at(argv[1]);
    if (listener < 0) {
        write_all(2, "ikos-fdkeeper: cannot listen at the socket\n");
        return 1;
    }
    if (write_all(1, "ready\n") < 0)
        return 1;
    for (;;) {
        int conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* out of descriptors or memory: wait for a drop rather than spin */
                struct timespec pause = {0, 100 * 1000 * 1000};
                nanosleep(&pause, NULL);
                continue;
            }
            return 1; /* the listener itself is broken: nothing more to serve */
        }
        int quit = session(conn);
        close(conn);
        if (quit)
            break;
    }
    while (count > 0)
        remove_at(count - 1);
    free(entries);
    unlink_at(argv[1]);
    return 0;
}
