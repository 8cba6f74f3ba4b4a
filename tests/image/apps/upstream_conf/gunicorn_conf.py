"""A user's config file written the upstream way: plain Gunicorn settings, nothing of ours imported."""

import json

workers = 2
bind = "0.0.0.0:8080"
loglevel = "info"
keepalive = 5
print(json.dumps({"workers": workers, "bind": bind, "loglevel": loglevel}), flush=True)
