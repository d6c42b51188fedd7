"""Stacked recurrent core (LSTM/GRU) and the model families built on it."""
