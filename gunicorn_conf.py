"""The image's default Gunicorn configuration (/gunicorn_conf.py): every value comes from the environment.

See the README's table of environment variables; gunicorn_prometheus.conf explains how to extend it.
"""

from gunicorn_prometheus.conf import gunicorn_settings

globals().update(gunicorn_settings())
