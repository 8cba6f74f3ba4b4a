"""The image's default Gunicorn configuration (/gunicorn_conf.py): every value comes from the environment.

Like upstream's, it prints the configuration as one JSON line when it is loaded, so `python
/gunicorn_conf.py` shows it too. Our hooks are installed by the master whatever config file is used.
See the README's table of environment variables.
"""

from gunicorn_prometheus.conf import gunicorn_settings

globals().update(gunicorn_settings())
