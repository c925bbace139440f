/*
 * forkchain: a process family whose anon_vma shape is known in advance.
 *
 *   forkchain REGIONS GENERATIONS [touch]
 *
 * Protocol (stdout lines are single write()s, so they never interleave):
 *   1. prints {"event":"start","pid":P} and waits for one byte on stdin, so
 *      the tracer can start filtering on P first;
 *   2. maps REGIONS separate private anonymous VMAs of 4 pages (PROT_NONE
 *      guards between them stop the kernel from merging them) and writes
 *      every page: each region gets a root anon_vma (depth 1) of its own
 *      (anon_vma_compatible() lets a fault reuse a neighbour's anon_vma,
 *      and no region has an anon neighbour);
 *   3. forks a chain: generation g forks generation g+1, up to GENERATIONS.
 *      All stay alive, so no anon_vma can be reused: generation g holds
 *      anon_vmas of depth g+1 and chains of length g+1 on every region.
 *      With "touch", each child writes its regions (COW faults);
 *   4. each generation prints {"event":"gen","gen":g,"pid":P,"regions":[...]},
 *      the last one also {"event":"ready"};
 *   5. every process waits for EOF on stdin, reaps its child and exits.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGES_PER_REGION 4

static void say(const char *buf)
{
    size_t len = strlen(buf);
    if (write(1, buf, len) != (ssize_t)len)
        _exit(3);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: forkchain REGIONS GENERATIONS [touch]\n");
        return 2;
    }
    int regions = atoi(argv[1]);
    int generations = atoi(argv[2]);
    int touch = argc > 3 && strcmp(argv[3], "touch") == 0;
    long page = sysconf(_SC_PAGESIZE);
    size_t rsize = PAGES_PER_REGION * page;
    char buf[8192];

    if (regions < 1 || regions > 256 || generations < 0 || generations > 1000) {
        fprintf(stderr, "forkchain: REGIONS 1..256, GENERATIONS 0..1000\n");
        return 2;
    }
    snprintf(buf, sizeof(buf), "{\"event\":\"start\",\"pid\":%d}\n", getpid());
    say(buf);
    char go;
    if (read(0, &go, 1) != 1)
        return 1;

    char *base = mmap(NULL, rsize * (2 * regions + 1), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    char *region[256];
    for (int r = 0; r < regions; r++) {
        region[r] = base + rsize * (2 * r + 1);
        if (mprotect(region[r], rsize, PROT_READ | PROT_WRITE)) {
            perror("mprotect");
            return 1;
        }
        for (size_t off = 0; off < rsize; off += page)
            region[r][off] = 1;
    }

    int gen = 0;
    pid_t child = -1;
    while (gen < generations) {
        child = fork();
        if (child < 0) {
            perror("fork");
            return 1;
        }
        if (child > 0)
            break;
        gen++;
        child = -1;
        if (touch)
            for (int r = 0; r < regions; r++)
                for (size_t off = 0; off < rsize; off += page)
                    region[r][off] = (char)gen;
    }

    int n = snprintf(buf, sizeof(buf), "{\"event\":\"gen\",\"gen\":%d,\"pid\":%d,\"regions\":[",
                     gen, getpid());
    for (int r = 0; r < regions && n < (int)sizeof(buf) - 40; r++)
        n += snprintf(buf + n, sizeof(buf) - n, "%s%lu", r ? "," : "",
                      (unsigned long)region[r]);
    snprintf(buf + n, sizeof(buf) - n, "]}\n");
    say(buf);
    if (gen == generations)
        say("{\"event\":\"ready\"}\n");

    while (read(0, &go, 1) > 0)
        ;
    if (child > 0)
        waitpid(child, NULL, 0);
    return 0;
}
