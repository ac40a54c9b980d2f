# Experiment: are stores into another process's CUDA IPC-mapped memory slower than loads from
# it on one GPU, for PyTorch's own copies too? Prints GB/s (bytes moved once), median of 7.
import sys, time, statistics
import torch
import torch.multiprocessing as mp

N = 1 << 30
PIECE = 4096

def owner(q, done):
    t = torch.empty(N, dtype=torch.uint8, device="cuda")
    t.fill_(1)
    torch.cuda.synchronize()
    q.put(t)
    done.wait()

def timeit(fn, reps=7):
    ts = []
    for _ in range(reps + 1):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return N / statistics.median(ts[1:]) / 1e9

def main():
    mp.set_start_method("spawn")
    q = mp.Queue(); done = mp.Event()
    p = mp.Process(target=owner, args=(q, done)); p.start()
    remote = q.get()
    local = torch.empty(N, dtype=torch.uint8, device="cuda"); local.fill_(2)
    other = torch.empty(N, dtype=torch.uint8, device="cuda"); other.fill_(3)
    nb = N // PIECE
    perm = torch.randperm(nb, device="cuda")
    r4 = lambda t: t.view(nb, PIECE // 16, 16).view(torch.int32).view(nb, PIECE // 4)
    rows = {}
    rows["copy local->local"] = timeit(lambda: other.copy_(local))
    rows["copy local->ipc (write)"] = timeit(lambda: remote.copy_(local))
    rows["copy ipc->local (read)"] = timeit(lambda: local.copy_(remote))
    rows["scatter4k local->local"] = timeit(lambda: r4(other).index_copy_(0, perm, r4(local)))
    rows["scatter4k local->ipc (write)"] = timeit(lambda: r4(remote).index_copy_(0, perm, r4(local)))
    rows["gather4k ipc->local (read)"] = timeit(lambda: torch.index_select(r4(remote), 0, perm, out=r4(local)))
    rows["gather4k local->local"] = timeit(lambda: torch.index_select(r4(other), 0, perm, out=r4(local)))
    rows["fill ipc"] = timeit(lambda: remote.fill_(7))
    rows["fill local"] = timeit(lambda: other.fill_(7))
    for k, v in rows.items():
        print(f"{k:32s} {v:9.1f} GB/s", flush=True)
    done.set(); p.join()

if __name__ == "__main__":
    main()
