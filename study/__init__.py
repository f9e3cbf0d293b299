"""The norm study (issue #13): runner and report; see STUDY.md."""
