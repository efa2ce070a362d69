import json,sys
for l in sys.stdin:
    r=json.loads(l); lg={k:(v['aff'],v['cpus'],v['ticks']) for k,v in r['lg_cpu'].items()}
    print(r['tag'], 'first', r['first'], 'w0 %.3f'%r['w0share'], 'lost %.4f'%r['lost_per_acc'], r['lost'], 'wk', r['wakeups'], 'lw', r['listen_wakeups'], 'sirq', r['softirq_jiffies'], 'idle', r['idle_jiffies'], 'netrx', r['netrx'], 'rps', int(r['rps']), 'ser', r['series'][:4], flush=True)
