import json, os, signal, subprocess, sys, threading, time, argparse
PY = "/work/main/.venv/bin/python"; PN = "/work/main/.venv/bin/parallelnet"
ap = argparse.ArgumentParser()
ap.add_argument("--strategy", default="exclusive"); ap.add_argument("--reps", type=int, default=6)
ap.add_argument("--order", default="")  # "", "01", "10", "alt"
ap.add_argument("--out", required=True); ap.add_argument("--dur", default="2s")
ap.add_argument("--backend", default="epoll")
a = ap.parse_args(); os.makedirs(a.out, exist_ok=True)
def stat_fields(path):
    s = open(path).read(); return s[s.rindex(")") + 2:].split()
def softirq():
    d = {}
    for line in open("/proc/softirqs"):
        p = line.split()
        if p[0] in ("NET_RX:", "NET_TX:"): d[p[0][:-1]] = list(map(int, p[1:3]))
    return d
for rep in range(a.reps):
    order = a.order if a.order != "alt" else ("01" if rep % 2 == 0 else "10")
    tag = f"{a.strategy}-{order or 'free'}-r{rep}"
    log = f"{a.out}/{tag}.reg"; stats = f"{a.out}/{tag}.jsonl"; lj = f"{a.out}/{tag}.lg.json"
    for p in (log, stats):
        if os.path.exists(p): os.remove(p)
    env = dict(os.environ, HR_LOG=log, HR_ORDER=order)
    cmd = [PY, "/tmp/helper-regime-w/wrap.py"] if a.backend == "epoll" else [PY, "-m", "parallelnet.core.cli"]
    srv = subprocess.Popen(cmd + ["serve", "--backend", a.backend, "--accept", a.strategy, "--workers", "2",
                            "--cpus", "0,1", "--message-size", "64", "--port", "0", "--stats-json", stats,
                            "--stats-interval", "0.25"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    port = None
    while True:
        line = srv.stdout.readline()
        if not line: break
        if line.startswith("listening on "): port = int(line.split()[-1].rpartition(":")[2]); break
    reg = [l.split() for l in open(log)] if os.path.exists(log) else []
    first = int(min(reg, key=lambda r: int(r[5]))[1]) if reg else None
    tids = {int(r[1]): int(r[2]) for r in reg}
    samples = []; stop = threading.Event()
    def sampler(lgpid_box):
        while not stop.is_set():
            row = {"t": time.monotonic()}
            for i, tid in tids.items():
                try: row[f"w{i}"] = int(stat_fields(f"/proc/{srv.pid}/task/{tid}/stat")[36])
                except Exception: pass
            if lgpid_box:
                try:
                    row["lg"] = []
                    for t in os.listdir(f"/proc/{lgpid_box[0]}/task"):
                        f = stat_fields(f"/proc/{lgpid_box[0]}/task/{t}/stat")
                        aff = [l.split()[1] for l in open(f"/proc/{lgpid_box[0]}/task/{t}/status") if l.startswith("Cpus_allowed_list")][0]
                        row["lg"].append((int(t), int(f[36]), int(f[11]) + int(f[12]), aff))
                except Exception: pass
            samples.append(row); time.sleep(0.1)
    box = []
    st0 = open("/proc/stat").read().splitlines()[1:3]; sq0 = softirq()
    th = threading.Thread(target=sampler, args=(box,)); th.start()
    lg = subprocess.Popen([PN, "loadgen", "--mode", "churn", "-c", "64", "-d", a.dur, "--warmup", "0.5", "--cpus", "1",
                           "--size", "64", "--json", lj, f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    box.append(lg.pid); lg.wait(); stop.set(); th.join()
    st1 = open("/proc/stat").read().splitlines()[1:3]; sq1 = softirq()
    srv.send_signal(signal.SIGINT); srv.communicate(timeout=20)
    recs = [json.loads(x) for x in open(stats) if x.strip()]
    recs = [r for r in recs if r.get("type") == "interval"]
    ser = []; acc = [0, 0]; lost = [0, 0]; wk = [0, 0]; lw = [0, 0]
    active = 0
    for r0, r1 in zip(recs, recs[1:]):
        d = [w1["accepted"] - w0["accepted"] for w0, w1 in zip(r0["workers"], r1["workers"])]
        if sum(d) < 100: continue
        active += 1
        ser.append(round(d[0] / sum(d), 2))
        if active <= 2: continue  # warm-up
        for i in range(2):
            acc[i] += d[i]; lost[i] += r1["workers"][i]["lost_races"] - r0["workers"][i]["lost_races"]
            wk[i] += r1["workers"][i]["wakeups"] - r0["workers"][i]["wakeups"]
            lw[i] += r1["workers"][i]["listen_wakeups"] - r0["workers"][i]["listen_wakeups"]
    tot = sum(acc) or 1
    def cpu_delta(a0, a1):  # per-cpu: user nice system idle iowait irq softirq
        x = list(map(int, a0.split()[1:8])); y = list(map(int, a1.split()[1:8])); return [v - u for u, v in zip(x, y)]
    cd = [cpu_delta(st0[i], st1[i]) for i in range(2)]
    sirq = [c[6] for c in cd]; idle = [c[3] for c in cd]
    w1cpu = {}; lgcpu = {}
    for s in samples:
        for k in ("w0", "w1"):
            if k in s: w1cpu.setdefault(k, {}).setdefault(s[k], 0); w1cpu[k][s[k]] += 1
        for (t, c, ticks, aff) in s.get("lg", []):
            e = lgcpu.setdefault(t, {"aff": aff, "cpus": {}, "ticks": 0}); e["cpus"][c] = e["cpus"].get(c, 0) + 1; e["ticks"] = ticks
    try: rps = json.load(open(lj)).get("rps")
    except Exception: rps = None
    res = {"tag": tag, "first": first, "w0share": round(acc[0] / tot, 3), "lost_per_acc": round(sum(lost) / tot, 4),
           "lost": lost, "acc": acc, "wakeups": wk, "listen_wakeups": lw, "series": ser, "softirq_jiffies": sirq, "idle_jiffies": idle,
           "netrx": [sq1["NET_RX"][i] - sq0["NET_RX"][i] for i in range(2)], "lastcpu": w1cpu, "lg_cpu": lgcpu, "rps": rps, "reg": reg}
    print(json.dumps(res), flush=True)
    with open(f"{a.out}/results.jsonl", "a") as f: f.write(json.dumps(res) + "\n")
