"""A one-model Django app for run_django.py."""
