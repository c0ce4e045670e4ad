"""`ollama-ft review`: the blind human review page (items, ratings store, Starlette app, page).

An entry-point package (top layer, like cli/pipeline/doctor): it reads the eval stage's outputs and
uses eval/human.py for the ratings format and the unblinded statistics, never the other way round.
"""
