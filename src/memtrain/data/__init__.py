"""Corpora, entity masking, neighbour search, and the MemTrain / long-text QA / search-QA dataset builders."""
