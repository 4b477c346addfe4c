"""`gunicorn api.wsgi:app`: the API configured from the environment (tally/config.py)."""

from api import settings_from_env
from api.app import create_app

app = create_app(settings_from_env())
