/*
 * forkloop: fork throughput of a process with many anonymous VMAs.
 *
 *   forkloop SECONDS [REGIONS [PAGES [MAXFORKS]]]
 *
 * Protocol (stdout lines are single write()s):
 *   1. maps REGIONS (default 16) separate private anonymous regions of PAGES
 *      (default 4) pages each, with PROT_NONE guard pages between and around
 *      them so the kernel cannot merge them into one VMA, and writes every
 *      page: each region is its own VMA with its own root anon_vma, so every
 *      fork runs anon_vma_fork() once per region and every child exit runs
 *      unlink_anon_vmas() once per region;
 *   2. prints {"event":"ready","pid":P} and waits for one byte on stdin, so a
 *      tracer can start (and filter on P) before the clock starts; EOF on
 *      stdin also starts the loop;
 *   3. forks in a loop for SECONDS of CLOCK_MONOTONIC time (or MAXFORKS forks
 *      if given and > 0, whichever comes first): fork(), the child _exit(0)s
 *      at once, the parent waitpid()s it;
 *   4. prints one JSON line with forks, elapsed_ns, forks_per_s and the
 *      process's CPU time (user/system, children included), then exits.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void say(const char *buf)
{
    size_t len = strlen(buf);
    if (write(1, buf, len) != (ssize_t)len)
        _exit(3);
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long tv_ns(struct timeval tv)
{
    return tv.tv_sec * 1000000000LL + tv.tv_usec * 1000LL;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: forkloop SECONDS [REGIONS [PAGES [MAXFORKS]]]\n");
        return 2;
    }
    double seconds = atof(argv[1]);
    int regions = argc > 2 ? atoi(argv[2]) : 16;
    int pages = argc > 3 ? atoi(argv[3]) : 4;
    long long maxforks = argc > 4 ? atoll(argv[4]) : 0;
    long page = sysconf(_SC_PAGESIZE);
    char buf[512];

    if (seconds <= 0 || regions < 1 || regions > 4096 || pages < 1 || pages > 65536) {
        fprintf(stderr, "forkloop: SECONDS > 0, REGIONS 1..4096, PAGES 1..65536\n");
        return 2;
    }
    size_t rsize = (size_t)pages * page;
    /* Layout: guard, region 0, guard, region 1, ..., region N-1, guard. */
    size_t total = (size_t)regions * (rsize + page) + page;
    char *base = mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (int r = 0; r < regions; r++) {
        char *reg = base + page + (size_t)r * (rsize + page);
        if (mprotect(reg, rsize, PROT_READ | PROT_WRITE)) {
            perror("mprotect");
            return 1;
        }
        for (size_t off = 0; off < rsize; off += page)
            reg[off] = 1;
    }

    snprintf(buf, sizeof(buf), "{\"event\":\"ready\",\"pid\":%d,\"regions\":%d,\"pages\":%d}\n",
             getpid(), regions, pages);
    say(buf);
    char go;
    if (read(0, &go, 1) < 0)
        return 1;

    long long limit = (long long)(seconds * 1e9);
    long long forks = 0, failed = 0;
    long long start = now_ns(), elapsed = 0;
    for (;;) {
        pid_t child = fork();
        if (child == 0)
            _exit(0);
        if (child < 0) {
            failed++;
            if (failed > 1000) {
                perror("fork");
                return 1;
            }
        } else {
            int status;
            while (waitpid(child, &status, 0) < 0)
                ;
            forks++;
        }
        elapsed = now_ns() - start;
        if (elapsed >= limit || (maxforks > 0 && forks >= maxforks))
            break;
    }

    struct rusage self, kids;
    getrusage(RUSAGE_SELF, &self);
    getrusage(RUSAGE_CHILDREN, &kids);
    snprintf(buf, sizeof(buf),
             "{\"event\":\"done\",\"pid\":%d,\"forks\":%lld,\"elapsed_ns\":%lld,"
             "\"forks_per_s\":%.1f,\"failed\":%lld,\"utime_ns\":%lld,\"stime_ns\":%lld,"
             "\"child_utime_ns\":%lld,\"child_stime_ns\":%lld}\n",
             getpid(), forks, elapsed, forks * 1e9 / (double)elapsed, failed,
             tv_ns(self.ru_utime), tv_ns(self.ru_stime),
             tv_ns(kids.ru_utime), tv_ns(kids.ru_stime));
    say(buf);
    return 0;
}
