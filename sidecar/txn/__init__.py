"""Transactions as the app sees them: the TM API and declarative rules."""
