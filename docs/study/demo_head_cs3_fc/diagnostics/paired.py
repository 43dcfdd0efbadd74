"""The paired figures of docs/STUDY.md sections 53-54 (run from the repository root):
python docs/study/demo_head_cs3_fc/diagnostics/paired.py"""
import json,statistics as s; D='docs/study/demo_head_cs3_fc'
E={e['name']:{r['seed']:r['metrics']['AP'] for r in e['runs']} for e in json.load(open(D+'/study.json'))['entries']}
for f in ('cross','heads_at_cost'): E.update({n:{int(k):m['AP'] for k,m in d.items()} for n,d in json.load(open(f'{D}/diagnostics/{f}/results.json'))['runs'].items()})
def p(a,b,seeds): d=[E[a][k]-E[b][k] for k in seeds]; print(a,'-',b,f'{s.mean(d):+.2f} ± {s.stdev(d)/len(d)**.5:.2f} ({sum(x>0 for x in d)} of {len(d)})')
S=[3,4,5,6]; p('s2neck_r04head','searched_middle_seed2',S); p('random_04','r04neck_s2head',S); p('random_04','s2neck_r04head',S); p('r04neck_s2head','searched_middle_seed2',S); p('s2neck_r04head','fpn',S)
H=[n for n in E if n.startswith('s2neck_rhead1')]; d=[E[n][k]-E['searched_middle_seed2'][k] for n in H for k in (3,4,5)]
print('random heads pooled - searched head', f'{s.mean(d):+.2f} ± {s.stdev(d)/len(d)**.5:.2f} ({sum(x>0 for x in d)} of {len(d)})')
for n in sorted(H): p(n, 'searched_middle_seed2', [3, 4, 5])
