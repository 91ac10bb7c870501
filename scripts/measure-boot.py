#!/usr/bin/env python3
"""Time from exec of `splitvisor run` to the guest's RESULT line, and the VMM's peak RSS
excluding guest memory (guest RAM is a memfd, counted as RssShmem; the VMM's own memory is
RssAnon + RssFile, sampled every 2 ms).

usage: scripts/measure-boot.py [RUNS] [-- extra splitvisor run args]"""
import os, statistics, subprocess, sys, threading, time

def status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None

def one_run(binary, extra):
    t0 = time.monotonic()
    p = subprocess.Popen([binary, "run", "--cmdline", "selftest", *extra],
                         stdout=subprocess.PIPE, text=True)
    peak = [0]
    def sample():
        while p.poll() is None:
            anon, file = status_kib(p.pid, "RssAnon"), status_kib(p.pid, "RssFile")
            if anon is not None and file is not None:
                peak[0] = max(peak[0], anon + file)
            time.sleep(0.002)
    threading.Thread(target=sample, daemon=True).start()
    t_result = None
    for line in p.stdout:
        if line.startswith("RESULT ") and t_result is None:
            t_result = time.monotonic() - t0
            assert '"status":"pass"' in line, line
    p.wait()
    return t_result, peak[0]

def main():
    args = sys.argv[1:]
    runs = int(args.pop(0)) if args and args[0].isdigit() else 10
    extra = args[1:] if args[:1] == ["--"] else args
    binary = os.environ.get("SPLITVISOR", "target/release/splitvisor")
    times, rss = [], []
    for _ in range(runs):
        t, r = one_run(binary, extra)
        times.append(t); rss.append(r)
    print(f"exec->RESULT over {runs} runs: median {statistics.median(times)*1000:.0f} ms "
          f"(min {min(times)*1000:.0f}, max {max(times)*1000:.0f}); "
          f"VMM peak RSS excl. guest memory: {max(rss)/1024:.1f} MiB (median {statistics.median(rss)/1024:.1f})")

main()
