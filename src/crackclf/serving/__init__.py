"""Serving: the HTTP API and web page over the one predictor (app.py, static/) and `crackclf serve` (commands.py)."""
