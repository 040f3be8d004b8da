"""medinfer.ui"""
