"""medinfer.serve"""
