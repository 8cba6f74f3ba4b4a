"""A user's own Gunicorn configuration written the documented way: our settings, then overrides."""

from gunicorn_prometheus.conf import gunicorn_settings

print("gunicorn_conf loaded: app_root", flush=True)

globals().update(gunicorn_settings())
workers = 1
