"""side4video.bench"""
