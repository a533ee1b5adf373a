"""Fitting learned solvers: teacher data (with an on-disk cache) and the fitting methods."""

from .teacher import TeacherData, TeacherSpec, default_teacher, generate_teacher, parse_teacher

__all__ = ["TeacherData", "TeacherSpec", "default_teacher", "generate_teacher", "parse_teacher"]
