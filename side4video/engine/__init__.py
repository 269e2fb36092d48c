"""side4video.engine"""
