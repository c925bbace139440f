/*
 * splits: one anonymous region split into many VMAs by mprotect().
 *
 *   splits PAGES
 *
 * Maps PAGES pages, writes them (one anon_vma, one chain entry), prints
 * {"event":"mapped","start":A}, waits for a byte on stdin, then makes every
 * other page read-only: the region becomes PAGES VMAs that all share the one
 * anon_vma, each with its own chain entry (anon_vma_clone at each split).
 * Prints {"event":"split"} and waits for EOF.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int pages = argc > 1 ? atoi(argv[1]) : 0;
    if (pages < 2 || pages > 4096) {
        fprintf(stderr, "usage: splits PAGES (2..4096)\n");
        return 2;
    }
    long page = sysconf(_SC_PAGESIZE);
    char *base = mmap(NULL, page * (pages + 2), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    char *region = base + page;
    if (mprotect(region, page * pages, PROT_READ | PROT_WRITE)) {
        perror("mprotect");
        return 1;
    }
    for (int i = 0; i < pages; i++)
        region[i * page] = 1;
    char buf[128];
    snprintf(buf, sizeof(buf), "{\"event\":\"mapped\",\"start\":%lu}\n", (unsigned long)region);
    if (write(1, buf, strlen(buf)) < 0)
        return 1;
    char c;
    if (read(0, &c, 1) != 1)
        return 1;
    for (int i = 1; i < pages; i += 2)
        if (mprotect(region + i * page, page, PROT_READ)) {
            perror("mprotect");
            return 1;
        }
    const char *msg = "{\"event\":\"split\"}\n";
    if (write(1, msg, strlen(msg)) < 0)
        return 1;
    while (read(0, &c, 1) > 0)
        ;
    return 0;
}
