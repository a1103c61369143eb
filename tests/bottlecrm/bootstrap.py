"""Creates an org, an admin user and profile, and a personal access token in a
freshly migrated BottleCRM database; prints the raw token (and only it).

Run with the BottleCRM settings in the environment:
    DJANGO_SETTINGS_MODULE=crm.settings DBNAME=... python bootstrap.py
"""

import django

django.setup()

from common.models import Org, PersonalAccessToken, Profile, User  # noqa: E402

user = User.objects.create_user(email="tributary-test@example.com", password="tributary-test-password")
org = Org.objects.create(name="Tributary test")
profile = Profile.objects.create(user=user, org=org, role="ADMIN", is_organization_admin=True, is_active=True)
raw, _ = PersonalAccessToken.generate(profile, "tributary")
print(raw)
