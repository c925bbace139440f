/*
 * idlers: many live processes, each with its own anonymous memory.
 *
 *   idlers COUNT [REGIONS]
 *
 * Forks COUNT children. Each writes REGIONS (default 4) private anonymous
 * regions of 2 pages (PROT_NONE guards keep them apart), tells the parent
 * through a pipe, and sleeps until the parent exits (PR_SET_PDEATHSIG).
 * The parent prints {"event":"ready","children":N} once all are set up,
 * then waits for EOF on stdin and exits, taking the children with it.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: idlers COUNT [REGIONS]\n");
        return 2;
    }
    int count = atoi(argv[1]), regions = argc > 2 ? atoi(argv[2]) : 4, fds[2];
    if (pipe(fds))
        return 1;
    signal(SIGCHLD, SIG_IGN);
    for (int i = 0; i < count; i++) {
        pid_t pid = fork();
        if (pid < 0)
            return 1;
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
            close(fds[0]);
            for (int r = 0; r < regions; r++) {
                char *m = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                if (m == MAP_FAILED || mprotect(m + 2 * 4096, 4096, PROT_NONE))
                    _exit(1);
                m[0] = m[4096] = 1;
            }
            char c = 1;
            if (write(fds[1], &c, 1) != 1)
                _exit(1);
            close(fds[1]);
            for (;;)
                pause();
        }
    }
    close(fds[1]);
    int ready = 0;
    char c;
    while (ready < count && read(fds[0], &c, 1) == 1)
        ready++;
    printf("{\"event\":\"ready\",\"children\":%d}\n", ready);
    fflush(stdout);
    while (read(0, &c, 1) > 0)
        ;
    return 0;
}
