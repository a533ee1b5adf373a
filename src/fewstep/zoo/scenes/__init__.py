"""Captioned scenes: a data set of one or two coloured shapes with captions (:mod:`.data`), and the attribute
classifier that measures prompt adherence on it (:mod:`.classifier`)."""
