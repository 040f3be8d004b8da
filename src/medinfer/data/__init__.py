"""medinfer.data"""
