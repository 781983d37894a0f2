"""The web page's templates: plain server-rendered HTML, escaped by Jinja2 (every prompt and name is the
caller's text), no script; metadata opens with <details>. Kept as strings: no files to ship."""

from __future__ import annotations

from jinja2 import DictLoader, Environment, select_autoescape

from fluxfarm.shared.units import duration_text

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 2em 2em; color: #222; }
header { display: flex; gap: 1.5em; align-items: baseline; border-bottom: 1px solid #ddd; margin-bottom: 1em; }
header h1 { font-size: 1.2em; } table { border-collapse: collapse; } td, th { padding: .3em .8em; text-align: left; }
tr:nth-child(even) { background: #f6f6f6; } progress { width: 12em; } .failed { color: #b00; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: .8em; }
.gallery figure { margin: 0; } .gallery img { width: 100%; height: auto; background: #eee; }
.gallery details { font-size: 12px; } .gallery dl { display: grid; grid-template-columns: auto 1fr; gap: 0 .5em; }
.gallery dt { color: #666; } .error { color: #b00; font-weight: bold; }
"""

_LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fluxfarm · {% block title %}{% endblock %}</title>
<link rel="stylesheet" href="/ui/style.css"></head>
<body><header><h1>fluxfarm</h1>{% if token %}<a href="/ui/">datasets</a><a href="/ui/fleet">fleet</a>
<span>token {{ token }}</span><form method="post" action="/ui/logout"><button>log out</button></form>{% endif %}
</header><main>{% block main %}{% endblock %}</main></body></html>"""

_LOGIN = """{% extends "layout" %}{% block title %}log in{% endblock %}{% block main %}
{% if error %}<p class="error">{{ error }}</p>{% endif %}
<form method="post" action="/ui/login"><label>Gateway token <input name="token" type="password" size="60"
autocomplete="off" required></label> <button id="login">log in</button></form>{% endblock %}"""

_DATASETS = """{% extends "layout" %}{% block title %}datasets{% endblock %}{% block main %}
<table id="datasets"><tr><th>dataset</th><th>progress</th><th>done/total</th><th>queued</th><th>running</th>
<th>failed</th><th>images/h</th><th>ETA</th></tr>
{% for r in records %}<tr><td><a href="/ui/datasets/{{ r.name }}">{{ r.name }}</a></td>
<td><progress max="{{ [r.total, 1]|max }}" value="{{ r.done + r.failed }}"></progress></td>
<td class="done">{{ r.done }}/{{ r.total }}</td><td>{{ r.queued }}</td><td>{{ r.running }}</td>
<td class="{{ 'failed' if r.failed else '' }}">{{ r.failed }}</td>
<td>{{ '%.0f'|format(r.rate_per_hour) if r.rate_per_hour else '-' }}</td>
<td>{{ duration(r.eta_s) }}</td></tr>{% else %}<tr><td colspan="8">no datasets yet</td></tr>{% endfor %}
</table>{% endblock %}"""

_DATASET = """{% extends "layout" %}{% block title %}{{ r.name }}{% endblock %}{% block main %}
<h2>{{ r.name }}</h2>
<p id="progress"><progress max="{{ [r.total, 1]|max }}" value="{{ r.done + r.failed }}"></progress>
<span class="done">{{ r.done }}/{{ r.total }} done</span>, {{ r.queued }} queued, {{ r.running }} running,
<span class="{{ 'failed' if r.failed else '' }}">{{ r.failed }} failed</span>,
{{ '%.0f'|format(r.rate_per_hour) if r.rate_per_hour else '-' }} images/h, ETA {{ duration(r.eta_s) }}</p>
<div class="gallery" id="gallery">{% for item in results %}<figure>
<a href="{{ item.url }}"><img src="/ui/thumbs/{{ r.name }}/{{ item.job_id }}.webp" alt="{{ item.result.job.prompt }}"
loading="lazy" width="256"></a>
<details><summary>{{ item.result.job.prompt|truncate(60) }}</summary><dl>
<dt>prompt</dt><dd class="prompt">{{ item.result.job.prompt }}</dd><dt>seed</dt><dd>{{ item.result.job.seed }}</dd>
<dt>size</dt><dd>{{ item.result.job.width }}x{{ item.result.job.height }}, {{ item.result.job.steps }} steps</dd>
<dt>level</dt><dd class="level">{{ item.result.quant.value }}</dd><dt>worker</dt><dd>{{ item.result.worker.node }}
({{ item.result.worker.gpu_name or item.result.worker.device }})</dd>
<dt>render</dt><dd>{{ '%.2f'|format(item.gpu_s) }} s GPU, batch {{ item.result.timings.batch_size }}</dd>
<dt>job</dt><dd>{{ item.job_id }}</dd></dl></details></figure>{% else %}<p>no images stored yet</p>{% endfor %}</div>
<p>{% if after %}<a href="/ui/datasets/{{ r.name }}">first page</a>{% endif %}
{% if next %} <a id="next" href="/ui/datasets/{{ r.name }}?after={{ next }}">next page</a>{% endif %}</p>
{% if letters %}<h3 class="failed">dead letters</h3><table id="dead-letters"><tr><th>job</th><th>attempts</th>
<th>worker</th><th>reason</th></tr>{% for d in letters %}<tr><td>{{ d.job_id }}</td><td>{{ d.attempts }}</td>
<td>{{ d.node }}</td><td>{{ d.reason }}</td></tr>{% endfor %}</table>{% endif %}{% endblock %}"""

_FLEET = """{% extends "layout" %}{% block title %}fleet{% endblock %}{% block main %}
<table id="fleet"><tr><th>worker</th><th>card</th><th>level</th><th>jobs done</th><th>images/h</th>
<th>last heartbeat</th></tr>{% for w in fleet.workers %}<tr><td>{{ w.node }}</td>
<td>{{ w.gpu_name or w.device }}</td><td>{{ w.level.value }}</td><td>{{ w.jobs_done }}</td>
<td>{{ '%.0f'|format(w.images_per_hour) if w.images_per_hour else '-' }}</td>
<td>{{ w.last_seen.strftime('%H:%M:%S') }} UTC</td></tr>{% else %}<tr><td colspan="6">no live worker</td></tr>
{% endfor %}</table>{% for q in fleet.unserved %}<p class="failed">{{ q.waiting }} jobs wait in {{ q.name }},
which no live worker serves</p>{% endfor %}{% endblock %}"""


pages = Environment(
    loader=DictLoader(
        {"layout": _LAYOUT, "login": _LOGIN, "datasets": _DATASETS, "dataset": _DATASET, "fleet": _FLEET}
    ),
    autoescape=select_autoescape(default=True, default_for_string=True),
)
pages.globals["duration"] = duration_text
