/*
 * reproducer: the shape of the 2012 report "Repeated fork() causes SLAB to
 * grow without bound": every generation writes its memory, forks the next
 * and exits, so only two or three processes are ever alive.
 *
 *   reproducer REGIONS GENERATIONS
 *
 * Generation g+1 waits until generation g has exited before it forks, which
 * makes the anon_vma reuse rule (num_children < 2 && num_active_vmas == 0,
 * commit 7a3ef208e662 and 2555283eb40d) apply the same way every time.
 * Each generation prints {"event":"gen","gen":g,"pid":P}; the last prints
 * {"event":"ready"} and waits for EOF on stdin before exiting.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static void say(const char *buf)
{
    size_t len = strlen(buf);
    if (write(1, buf, len) != (ssize_t)len)
        _exit(3);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: reproducer REGIONS GENERATIONS\n");
        return 2;
    }
    int regions = atoi(argv[1]), generations = atoi(argv[2]);
    if (regions < 1 || regions > 64 || generations < 1 || generations > 100000) {
        fprintf(stderr, "reproducer: REGIONS 1..64, GENERATIONS 1..100000\n");
        return 2;
    }
    long page = sysconf(_SC_PAGESIZE);
    /* Guard pages around every region keep them separate VMAs. */
    char *base = mmap(NULL, page * (2 * regions + 1), PROT_NONE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (int r = 0; r < regions; r++)
        if (mprotect(base + page * (2 * r + 1), page, PROT_READ | PROT_WRITE)) {
            perror("mprotect");
            return 1;
        }
    char buf[128];
    for (int gen = 0;; gen++) {
        for (int r = 0; r < regions; r++)
            base[page * (2 * r + 1)] = (char)gen;
        snprintf(buf, sizeof(buf), "{\"event\":\"gen\",\"gen\":%d,\"pid\":%d}\n", gen, getpid());
        say(buf);
        if (gen == generations)
            break;
        pid_t parent = getpid();
        pid_t child = fork();
        if (child < 0) {
            perror("fork");
            return 1;
        }
        if (child > 0)
            _exit(0);
        while (getppid() == parent)
            usleep(1000);
    }
    say("{\"event\":\"ready\"}\n");
    char c;
    while (read(0, &c, 1) > 0)
        ;
    return 0;
}
