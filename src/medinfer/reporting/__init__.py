"""medinfer.reporting"""
