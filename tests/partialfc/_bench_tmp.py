import time, torch, resource
from partialfc import PartialFC, comm_stats
def bench(rank, ws, C, lam, steps=4):
    torch.set_num_threads(1)
    D, B, r = 512, 128, 0.1
    head = PartialFC(C, D, sample_rate=r, discface_lambda=lam)
    opt = head.make_optimizer(lr=0.1)
    g = torch.Generator().manual_seed(rank)
    f = torch.randn(B, D, generator=g, requires_grad=True); y = torch.randint(0, C, (B,), generator=g)
    S = head.last.get("num_sampled") or -(-(head.end-head.start)//10)
    z = torch.randn(B*ws, D); w = torch.randn(S, D)
    def floor():
        t=time.perf_counter(); l = z@w.T; a = l@w; b = l.T@z; return time.perf_counter()-t
    def step():
        t=time.perf_counter(); opt.zero_grad(); loss = head(f, y); loss.backward(); opt.step(); return time.perf_counter()-t
    step(); floor()
    st = []; fl = []
    for _ in range(steps):
        torch.distributed.barrier(); st.append(step()); torch.distributed.barrier(); fl.append(floor())
    comm_stats.reset(); step()
    return dict(step=sorted(st)[len(st)//2], floor=sorted(fl)[len(fl)//2], bytes=comm_stats.bytes_sent,
                maxrss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20,
                shard_wm_gb=2*head.weight.numel()*4/2**30)
