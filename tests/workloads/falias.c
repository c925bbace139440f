/*
 * falias: one anonymous page whose false aliasing is known by construction,
 * and a way to make the kernel walk its rmap.
 *
 *   falias CHILDREN KEEPER
 *
 * The parent (process 0) maps one private anonymous page between two
 * PROT_NONE guard pages (no neighbour can lend it an anon_vma, so the fault
 * gives it a root anon_vma A of its own) and writes it. It forks CHILDREN
 * children (processes 1..CHILDREN, in order): each child VMA is linked into
 * A's interval tree, after the parent's and the earlier children's. Then
 * every process except KEEPER writes the page: copy-on-write gives each its
 * own page (of its own anon_vma, root A). The original page is left mapped
 * by exactly one VMA, the KEEPER's, while A's tree holds CHILDREN+1 VMAs
 * covering it: an rmap walk of that page that does not stop early visits
 * CHILDREN+1 VMAs for 1 mapping.
 *
 * Protocol (stdout lines are single write()s, so they never interleave):
 *   1. each process prints {"event":"proc","idx":I,"pid":P,"pfn":F} once it
 *      has its page (F from /proc/self/pagemap: 0 unless root);
 *   2. the parent prints {"event":"ready","pid":P,"keeper":K} and waits for
 *      a command byte on stdin:
 *      'o': the KEEPER soft-offlines its page (madvise MADV_SOFT_OFFLINE,
 *           needs CAP_SYS_ADMIN and CONFIG_MEMORY_FAILURE): the kernel
 *           migrates it to a new page, which takes two rmap walks of A
 *           (try_to_migrate, which stops once the page is unmapped, and
 *           remove_migration_ptes, which visits every VMA), and prints
 *           {"event":"offlined","pid":P,"rc":R,"errno":E,"pfn_before":F,
 *            "pfn_after":G,"intact":1|0};
 *   3. at EOF on stdin every process exits (the parent reaps the children).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef MADV_SOFT_OFFLINE
#define MADV_SOFT_OFFLINE 101
#endif
#define MAX_CHILDREN 1000

static void say(const char *buf)
{
    size_t len = strlen(buf);
    if (write(1, buf, len) != (ssize_t)len)
        _exit(3);
}

static uint64_t pfn_of(const void *addr, long page)
{
    uint64_t v = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0)
        return 0;
    off_t off = (off_t)((uintptr_t)addr / (uintptr_t)page) * 8;
    if (pread(fd, &v, sizeof(v), off) != (ssize_t)sizeof(v))
        v = 0;
    close(fd);
    return (v >> 63) ? (v & ((1ULL << 55) - 1)) : 0;
}

static void report_page(int idx, const char *p, long page)
{
    char buf[256];
    snprintf(buf, sizeof(buf), "{\"event\":\"proc\",\"idx\":%d,\"pid\":%d,\"pfn\":%llu}\n",
             idx, getpid(), (unsigned long long)pfn_of(p, page));
    say(buf);
}

static void offline(char *p, long page, char expect)
{
    char buf[256];
    uint64_t before = pfn_of(p, page);
    int rc = madvise(p, (size_t)page, MADV_SOFT_OFFLINE);
    int err = rc ? errno : 0;
    uint64_t after = pfn_of(p, page);
    snprintf(buf, sizeof(buf), "{\"event\":\"offlined\",\"pid\":%d,\"rc\":%d,\"errno\":%d,"
             "\"pfn_before\":%llu,\"pfn_after\":%llu,\"intact\":%d}\n", getpid(), rc, err,
             (unsigned long long)before, (unsigned long long)after, p[0] == expect);
    say(buf);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: falias CHILDREN KEEPER\n");
        return 2;
    }
    int children = atoi(argv[1]);
    int keeper = atoi(argv[2]);
    if (children < 1 || children > MAX_CHILDREN || keeper < 0 || keeper > children) {
        fprintf(stderr, "falias: CHILDREN 1..%d, KEEPER 0..CHILDREN\n", MAX_CHILDREN);
        return 2;
    }
    long page = sysconf(_SC_PAGESIZE);
    char *guarded = mmap(NULL, 3 * (size_t)page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (guarded == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    char *p = guarded + page;
    if (mprotect(p, (size_t)page, PROT_READ | PROT_WRITE)) {
        perror("mprotect");
        return 1;
    }
    p[0] = 'P';

    int ack[2];
    static int go[MAX_CHILDREN + 1][2];
    static pid_t pids[MAX_CHILDREN + 1];
    if (pipe(ack))
        return 1;
    for (int i = 1; i <= children; i++) {
        if (pipe(go[i]))
            return 1;
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            close(go[i][1]);
            if (i != keeper)
                p[0] = (char)('a' + i % 26);   /* copy-on-write */
            report_page(i, p, page);
            char c = 'k';
            if (write(ack[1], &c, 1) != 1)
                _exit(1);
            while (read(go[i][0], &c, 1) == 1) {
                if (c == 'o') {
                    offline(p, page, 'P');
                    if (write(ack[1], &c, 1) != 1)
                        _exit(1);
                }
            }
            _exit(0);
        }
        close(go[i][0]);
        pids[i] = pid;
    }
    if (keeper != 0)
        p[0] = 'Q';   /* copy-on-write */
    report_page(0, p, page);
    for (int i = 1; i <= children; i++) {
        char c;
        if (read(ack[0], &c, 1) != 1)
            return 1;
    }
    char buf[256];
    snprintf(buf, sizeof(buf), "{\"event\":\"ready\",\"pid\":%d,\"keeper\":%d}\n", getpid(),
             keeper);
    say(buf);

    char c;
    while (read(0, &c, 1) == 1) {
        if (c != 'o')
            continue;
        if (keeper == 0) {
            offline(p, page, 'P');
        } else {
            if (write(go[keeper][1], &c, 1) != 1 || read(ack[0], &c, 1) != 1)
                return 1;
        }
    }
    for (int i = 1; i <= children; i++)
        close(go[i][1]);
    int status = 0;
    for (int i = 1; i <= children; i++)
        if (waitpid(pids[i], &status, 0) < 0)
            return 1;
    return 0;
}
